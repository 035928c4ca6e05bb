"""`python -m adapterkit`: the same command as `adapterkit`."""

from .cli.main import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="adapterkit")
