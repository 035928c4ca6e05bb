"""Masked-LM adapters on encoders: the head is BERT's, masks follow BERT's recipe, training lowers
the masked-token loss with only adapter + head tensors changing, and the head saves, reloads,
resumes and runs through the CLI."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import WORDS, save_tiny_tokenizer, tiny_bert, tiny_llama
from typer.testing import CliRunner

from adapterkit import (Adapter, AdapterRuntime, BaseMismatchError, ConfigError, CorruptAdapterError, LoraConfig,
                        create_adapter, load_base)
from adapterkit.cli.main import app
from adapterkit.data import DataFormatError
from adapterkit.core.heads import ClassificationHead, MLMHead, load_head
from adapterkit.store import AdapterStore
from adapterkit.train.mlm import MaskCollator, encode_texts, evaluate_mlm, mlm_loss, read_texts, train_mlm
from adapterkit.train.trainer import TrainConfig, train

CORPUS = ["the cat runs fast", "a dog is on the mat", "write clear code", "hello world",
          "the dog runs slow", "give me one tip", "a cat is on the mat", "the cat and the dog"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_bert_tokenizer(path):
    """conftest's tiny tokenizer has no [MASK] and adds no [CLS]/[SEP]: a BERT-style one over the
    same 97-id vocabulary (ids 0-4 special, '[CLS] text [SEP]')."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(97 - len(SPECIALS) - len(WORDS))]
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(path))


@pytest.fixture
def bert_dir(tmp_path):
    path = tmp_path / "bert"
    tiny_bert(initializer_range=0.2).save_pretrained(str(path))    # wider init: see test_trainer
    save_bert_tokenizer(path)
    return path


def test_fixture_tokenizer_has_a_mask_token_and_conftest_s_lacks_one(bert_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    assert tok.mask_token_id == 4 and tok("cat")["input_ids"] == [2, tok.convert_tokens_to_ids("cat"), 3]
    save_tiny_tokenizer(tmp_path / "plain")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "plain")).mask_token_id is None
    with pytest.raises(ConfigError, match="the tokenizer has no mask token"):
        MaskCollator(AutoTokenizer.from_pretrained(str(tmp_path / "plain")), 97)


def test_fresh_head_matches_transformers_bert_mlm_head():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_act="gelu", layer_norm_eps=1e-7)
    hf = BertForMaskedLM(cfg).eval()
    pred = hf.cls.predictions
    with torch.no_grad():                        # non-trivial LayerNorm and bias, so the test can fail
        for p in (pred.transform.LayerNorm.weight, pred.transform.LayerNorm.bias, pred.bias):
            p.normal_()
    head = MLMHead.create(cfg, seed=1)
    assert head.hidden_act == "gelu" and head.layer_norm_eps == 1e-7
    assert torch.equal(head.bias, torch.zeros(97)) and head.dense_weight.shape == (32, 32)
    state = pred.state_dict()
    for name, field in MLMHead.NAMES.items():
        setattr(head, field, state[name].clone())
    ids = torch.randint(5, 97, (3, 9))
    with torch.no_grad():
        hidden = hf.bert(ids).last_hidden_state
        ours = head.logits(hidden, hf.bert.get_input_embeddings().weight)
        torch.testing.assert_close(ours, hf(ids).logits)
    with pytest.raises(BaseMismatchError, match=r"embeddings of shape \(97, 32\).*the base has \(50, 32\)"):
        head.logits(hidden, torch.zeros(50, 32))


def test_masking_statistics(bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    collate = MaskCollator(tok, 97)
    gen = torch.Generator().manual_seed(0)
    docs = [[2] + torch.randint(5, 97, (int(n),), generator=gen).tolist() + [3]
            for n in torch.randint(20, 60, (400,), generator=gen)]                    # ~16k real tokens, padding
    torch.manual_seed(0)
    batch = collate(docs)
    ids, mask, labels, inputs = (torch.full_like(batch["input_ids"], 0), batch["attention_mask"], batch["labels"],
                                 batch["input_ids"])
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.tensor(d)
    chosen = labels != -100
    maskable = (mask == 1) & (ids > 4)
    assert not (chosen & ~maskable).any()                                  # never [CLS]/[SEP]/pad
    assert torch.equal(inputs[~chosen], ids[~chosen])                      # unchosen tokens untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert 0.13 < chosen.sum() / maskable.sum() < 0.17
    n = chosen.sum()
    as_mask = (inputs[chosen] == tok.mask_token_id).sum() / n
    kept = (inputs[chosen] == ids[chosen]).sum() / n
    replaced = 1 - as_mask - kept
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.13 and 0.07 < replaced < 0.13
    assert (inputs[chosen] > 4).sum() + (inputs[chosen] == tok.mask_token_id).sum() == n   # random ids: no specials
    # short rows (one maskable token each) still get one masked label; the same seed, the same masks
    short = [[2, 7, 3], [2, 9, 3, 0, 0][:3], [2, 5, 3]] * 20
    torch.manual_seed(1)
    out = collate(short)
    assert ((out["labels"] != -100).sum(1) == 1).all() and (out["labels"][:, [0, 2]] == -100).all()
    torch.manual_seed(0)                                 # masks come from the global RNG the trainer seeds
    assert torch.equal(collate(docs)["input_ids"], inputs)
    torch.manual_seed(1)
    assert not torch.equal(collate(docs)["input_ids"], inputs)


def _setup(bert_dir, seed=0):
    base = load_base(str(bert_dir))
    adapter = create_adapter("lang", base.model, LoraConfig(r=4, alpha=8, target_modules=["query", "value", "dense"]),
                             seed=seed, fingerprint=base.fingerprint, base_name=base.name)
    adapter.head = MLMHead.create(base.model.config, seed=seed)
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    return base, adapter, rt


def test_training_lowers_the_masked_loss_and_only_adapter_and_head_change(bert_dir, tmp_path):
    base, adapter, rt = _setup(bert_dir)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    head_before = [p.clone() for p in adapter.head.params()]
    initial = evaluate_mlm(rt, adapter, CORPUS * 4, 32)                       # ~40 masked tokens
    assert evaluate_mlm(rt, adapter, CORPUS * 4, 32) == initial                  # fixed masks: the same score
    docs, _, _ = encode_texts(base.tokenizer, CORPUS * 4, 32)
    res = train(rt, "lang", docs, MaskCollator(base.tokenizer, 97), mlm_loss(adapter.head),
                TrainConfig(steps=60, batch_size=8, lr=2e-2), extra_params=adapter.head.params())
    torch.rand(3)                                                             # the global RNG moved on
    final = evaluate_mlm(rt, adapter, CORPUS * 4, 32)
    assert final["loss"] < 0.7 * initial["loss"] and final["accuracy"] > initial["accuracy"]
    assert final["perplexity"] == pytest.approx(torch.tensor(final["loss"]).exp().item(), rel=1e-5)
    assert final["n"] == 4 * len(CORPUS) and res.losses[-1] < res.losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(head_before, adapter.head.params()))
    assert all(parts["lora_B"].abs().sum() > 0 for site, parts in adapter.tensors.items() if "pooler" not in site)
    assert not any(p.requires_grad for p in adapter.head.params())

    adapter.save(tmp_path / "saved")
    loaded = Adapter.load(tmp_path / "saved")
    assert isinstance(loaded.head, MLMHead) and loaded.head.hidden_act == adapter.head.hidden_act
    assert json.loads((tmp_path / "saved" / "task_head.json").read_text())["type"] == "adapterkit.mlm_head"
    assert all(torch.equal(a, b) for a, b in zip(loaded.head.params(), adapter.head.params()))
    rt2 = AdapterRuntime.from_base(load_base(str(bert_dir)))
    rt2.add(loaded)
    assert evaluate_mlm(rt2, loaded, CORPUS * 4, 32) == final


def test_resume_replays_the_masks_and_the_loss_curve(bert_dir, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=3, grad_accum=2, lr=5e-3, warmup_steps=2, seed=5)

    def run(checkpointed, **kwargs):
        base, adapter, rt = _setup(bert_dir)
        docs, _, _ = encode_texts(base.tokenizer, CORPUS, 32)
        res = train(rt, "lang", docs, MaskCollator(base.tokenizer, 97), mlm_loss(adapter.head), checkpointed,
                    extra_params=adapter.head.params(), **kwargs)
        return res, adapter

    full, straight = run(cfg)                                 # BERT's own dropout (0.1) is on while training

    def stop(record):
        if record["step"] == 5:                               # killed after step 5; the checkpoint holds step 3
            raise KeyboardInterrupt

    checkpointed = replace(cfg, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        run(checkpointed, checkpoint_dir=tmp_path / "ck", on_step=stop)
    torch.rand(5)
    resumed, again = run(checkpointed, checkpoint_dir=tmp_path / "ck", resume=True)
    assert len(set(full.losses)) == len(full.losses)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for a, b in zip(again.head.params(), straight.head.params()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_mlm_counts_truncation_and_stores_the_head(bert_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    long_doc = " ".join(["the cat runs fast"] * 40)                           # 160 words >> max_length 16
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, eval_every=2)
    base = load_base(str(bert_dir))
    _, metrics = train_mlm(base, "lang", CORPUS + [long_doc], CORPUS, task="toy",
                                 store=store, config=cfg, r=4, max_length=16, progress=False)
    params = store.show("lang")["lineage"][0]["params"]
    assert params["objective"] == "mlm" and params["truncated_examples"] == 1 and params["train_examples"] == 9
    assert params["best_step"] in (2, 4) and set(metrics) == {"loss", "perplexity", "accuracy", "n"}
    assert store.show("lang")["metrics"]["validation_loss"] == metrics["loss"]
    assert isinstance(store.get("lang").head, MLMHead)
    assert encode_texts(base.tokenizer, [long_doc, "cat", "[MASK] [SEP]"], 16)[1:] == (1, 1)   # cut; no maskable token


def test_refusals_and_readers(bert_dir, tmp_path):
    llm = tmp_path / "llm"
    tiny_llama().save_pretrained(str(llm))
    save_tiny_tokenizer(llm)
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ConfigError, match=r"^masked-LM training needs an encoder base "
                       r"\(BERT-style, e\.g\. minilm-l6\); "
                       r".*llm is a causal-lm model: use --objective causal-lm for it$"):
        train_mlm(load_base(str(llm)), "x", CORPUS, [], task=None, store=store, config=TrainConfig(steps=1))
    with pytest.raises(ConfigError, match="max_length 100 is longer than the 64 positions"):
        train_mlm(load_base(str(bert_dir)), "x", CORPUS, [], task=None, store=store, config=TrainConfig(steps=1),
                  max_length=100)
    # classification heads still load as before; an unknown head type is named
    head = ClassificationHead.create(["a", "b"], 8, "mean")
    head.save(tmp_path)
    assert isinstance(load_head(tmp_path), ClassificationHead)
    (tmp_path / "task_head.json").write_text(json.dumps({"type": "adapterkit.crf_head"}))
    with pytest.raises(CorruptAdapterError, match="has type 'adapterkit.crf_head'; this adapterkit reads the heads"):
        load_head(tmp_path)

    (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\n")
    assert read_texts(tmp_path / "a.txt") == ["first doc", "second doc"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x y"}) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: malformed JSON"):
        read_texts(tmp_path / "a.jsonl", "body")
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: missing field 'text' \(fields present: 'body'\)"):
        read_texts(tmp_path / "a.jsonl")
    with pytest.raises(DataFormatError, match=r"cannot tell the format from the extension '\.csv'"):
        read_texts(tmp_path / "a.csv")


def test_cli_train_then_eval(bert_dir, tmp_path):
    train_file, dev = tmp_path / "de.txt", tmp_path / "de-dev.jsonl"
    train_file.write_text("\n".join(CORPUS * 2) + "\n")
    dev.write_text("\n".join(json.dumps({"sentence": t}) for t in CORPUS) + "\n")
    runner = CliRunner()
    common = ["--base", str(bert_dir), "--store", str(tmp_path / "s")]
    res = runner.invoke(app, ["train", "--objective", "mlm", "--name", "de-lang", "--train-file", str(train_file),
                              "--steps", "6", "--batch-size", "4", "--max-length", "32", "--no-progress", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "de-lang", "--file", str(dev), "--text-field", "sentence", "--max-length", "32",
                              "--json", *common])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)           # stdout: eval's progress lines go to stderr
    assert got["adapter"] == "de-lang" and got["n"] == len(CORPUS) and 0 <= got["accuracy"] <= 1 and got["loss"] > 0
    res = runner.invoke(app, ["eval", "de-lang", *common])
    assert res.exit_code == 2 and "is a masked-LM adapter: give --file" in res.output
    res = runner.invoke(app, ["train", "--objective", "mlx", "--name", "y", "--train-file", str(train_file), *common])
    assert res.exit_code == 2 and "unknown objective 'mlx'; use classification, causal-lm, mlm or vqa" in res.output
