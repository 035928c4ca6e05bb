"""`python -m adapterkit.cli` (what torchrun -m runs): the same command as `adapterkit`."""

from .main import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="adapterkit")
