"""quantnoise.hf.save_pretrained / from_pretrained and transformers' own from_pretrained (the registered
``quantnoise`` quantizer) on BERT, GPT-2 and Llama built from small configs: every dense layer noised and
compressed, loaded compressed with no layer decoded, outputs equal to the compressed model's."""
import json
import pathlib

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from quantnoise import LayerRule, QuantNoiseConfig, compress_, quantize_, unquantize_  # noqa: E402
from quantnoise import hf  # noqa: E402
from quantnoise.runtime import RuntimeMixin, runtime_summary  # noqa: E402

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32),
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=32),
    "bert": lambda: tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  vocab_size=96, max_position_embeddings=32),
}
AUTO = {"gpt2": tf.AutoModelForCausalLM, "llama": tf.AutoModelForCausalLM, "bert": tf.AutoModel}


def build(arch, seed=0):
    torch.manual_seed(seed)
    return AUTO[arch].from_config(CONFIGS[arch]())


def dense_layers(model):
    """Every Linear / Conv1D / Embedding, once (tied ones under one name)."""
    return {id(m) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_every_dense_layer_noised_compressed_and_loaded_compressed(tmp_path, arch, caplog):
    model = build(arch)
    n_dense = len(dense_layers(model))
    names = quantize_(model, QuantNoiseConfig(scheme="pq", p=0.2, block_size=4, n_centroids=16))
    assert len({id(model.get_submodule(n)) for n in names}) == n_dense  # GPT-2: the 8 Conv1D included
    model.train()
    ids = torch.randint(0, 96, (2, 8))
    out = model(ids)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    unquantize_(model)
    compressed = compress_(model, LayerRule(block_size=4, n_centroids=16))
    assert len({id(model.get_submodule(n)) for n in compressed}) == n_dense
    model.eval()
    folder = hf.save_pretrained(model, tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quantnoise" and (folder / "model.safetensors").is_file()
    with torch.no_grad():
        want = model(ids)[0]
    with caplog.at_level("WARNING"):
        ours = hf.from_pretrained(folder)
        theirs = AUTO[arch].from_pretrained(str(folder))  # transformers' own loader, through the quantizer
    assert "decoding" not in caplog.text and "newly initialized" not in caplog.text
    for loaded in (ours, theirs):
        assert type(loaded) is type(model) and not loaded.training
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        summary = runtime_summary(loaded)
        assert sum(summary.values()) == len([m for m in loaded.modules() if isinstance(m, RuntimeMixin)])
        assert not any(isinstance(m, (nn.Linear, Conv1D, nn.Embedding)) and not isinstance(m, RuntimeMixin)
                       for m in loaded.modules())  # no layer left plain (decoded)
        with torch.no_grad():
            assert rel_err(loaded(ids)[0], want) < 1e-3
    if arch != "bert":
        with torch.no_grad():
            gen = ours.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 12) and torch.equal(gen[:, :8], ids[:1])


def test_tokenizer_saved_with_the_model_and_bad_folders_are_one_line(tmp_path):
    model = build("bert")
    compress_(model, LayerRule(pattern="encoder", block_size=4, n_centroids=16))
    tok = hf.load_tokenizer()
    folder = hf.save_pretrained(model, tmp_path / "b", tokenizer=tok)
    assert tf.AutoTokenizer.from_pretrained(str(folder))("a test")["input_ids"] == tok("a test")["input_ids"]
    with pytest.raises(ValueError, match="is not a quantnoise model folder"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="takes a transformers PreTrainedModel"):
        hf.save_pretrained(nn.Linear(2, 2), tmp_path / "x")
    config = json.loads((folder / "config.json").read_text())  # model.qnz now belongs to another architecture
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the model"):
        hf.from_pretrained(folder)
    for bad in ("../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", 3):  # the weights' name stays inside the folder
        config["num_hidden_layers"] = 2
        config["quantization_config"]["weights"] = bad
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="must name a file in that folder"):
            hf.from_pretrained(folder)


def same_qnz(a, b):
    """Two .qnz files hold the same tensors and the same map."""
    from quantnoise.export import read_qnz

    (ta, ma), (tb, mb) = read_qnz(a), read_qnz(b)
    return ma == mb and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def bert_classifier(seed=0):
    torch.manual_seed(seed)
    config = CONFIGS["bert"]()
    config.num_labels = 3
    return tf.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "bert_cls"])
def test_model_save_pretrained_writes_the_quantnoise_folder(tmp_path, arch):
    model = bert_classifier() if arch == "bert_cls" else build(arch).eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    model.save_pretrained(tmp_path / "theirs")  # transformers' own verb (push_to_hub writes the same folder)
    ours = hf.save_pretrained(model, tmp_path / "ours")
    assert same_qnz(tmp_path / "theirs" / "model.safetensors", ours / "model.safetensors")
    configs = [json.loads((d / "config.json").read_text()) for d in (tmp_path / "theirs", ours)]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"]
    assert configs[0]["quantization_config"]["compressed_layers"] == len(dense_layers(model)) - (arch == "gpt2")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    tol = 1e-2 if arch == "bert_cls" else 1e-3  # the untrained classifier's logits are ~5e-3: fp16 LayerNorms show
    with torch.no_grad():
        want = model(ids).logits
        for folder in (tmp_path / "theirs", ours):
            loaded = type(model).from_pretrained(str(folder))
            assert runtime_summary(loaded) and rel_err(loaded(ids).logits, want) < tol


@pytest.mark.parametrize("rule", [LayerRule(block_size=4, n_centroids=16), LayerRule(scheme="scalar", bits=4),
                                  LayerRule(scheme="scalar", bits=3, rows_per_scale=4),
                                  LayerRule(scheme="scalar", bits=8)], ids=["pq", "int4", "int3_groups", "int8"])
def test_a_loaded_model_resaves_both_ways_to_the_same_file(tmp_path, rule):
    model = build("gpt2").eval()
    compress_(model, rule)
    first = hf.save_pretrained(model, tmp_path / "first")
    for i, loaded in enumerate((hf.from_pretrained(first), tf.AutoModelForCausalLM.from_pretrained(str(first)))):
        loaded.save_pretrained(tmp_path / f"theirs{i}")
        hf.save_pretrained(loaded, tmp_path / f"ours{i}")
        for again in (tmp_path / f"theirs{i}", tmp_path / f"ours{i}"):
            assert same_qnz(again / "model.safetensors", first / "model.safetensors"), again
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(hf.from_pretrained(tmp_path / "theirs1")(ids).logits, hf.from_pretrained(first)(ids).logits)


def test_unsafe_serialization_is_refused_naming_the_fix(tmp_path):
    model = build("gpt2").eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    with pytest.raises(ValueError, match="with safe_serialization=True"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    torch.save(model, tmp_path / "whole.pt")  # the attached quantizer pickles with the model
    model.save_pretrained(tmp_path / "shards", max_shard_size="2KB")  # transformers cuts the .qnz into shards
    for load in (tf.AutoModelForCausalLM.from_pretrained, hf.from_pretrained):
        with pytest.raises(ValueError, match="save it with a max_shard_size larger than the model"):
            load(str(tmp_path / "shards"))


def test_a_folder_of_an_earlier_version_still_loads(tmp_path):
    """model.qnz beside an index of no shard, quantization_config.weights naming it (quantnoise before 33)."""
    from quantnoise import save_qnz

    model = build("gpt2").eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    save_qnz(model, tmp_path / "model.qnz")
    config = model.config.to_dict()
    config.update(architectures=["GPT2LMHeadModel"], quantization_config={"quant_method": "quantnoise",
                                                                         "weights": "model.qnz"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (hf.from_pretrained(tmp_path), tf.AutoModelForCausalLM.from_pretrained(str(tmp_path))):
            assert rel_err(loaded(ids).logits, want) < 1e-3


def test_automodel_and_the_feature_extraction_pipeline_get_the_base_model_of_a_head_folder(tmp_path):
    tok = hf.load_tokenizer()
    torch.manual_seed(0)
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=3)
    model = tf.BertForSequenceClassification(config).eval()
    compress_(model, LayerRule(block_size=8, n_centroids=16, kmeans_iters=2))
    folder = hf.save_pretrained(model, tmp_path / "cls", tokenizer=tok)
    ids = tok("a small test", return_tensors="pt")
    with torch.no_grad():
        want = model.bert(**ids).last_hidden_state
        for base in (tf.AutoModel.from_pretrained(str(folder)), hf.from_pretrained(folder, model_class=tf.AutoModel)):
            assert type(base) is tf.BertModel and runtime_summary(base)
            assert rel_err(base(**ids).last_hidden_state, want) < 1e-2
    hidden = torch.tensor(tf.pipeline("feature-extraction", model=str(folder))("a small test"))
    assert hidden.shape == (1, ids["input_ids"].shape[1], 32) and rel_err(hidden, want) < 1e-2
    gpt2 = build("gpt2").eval()  # GPT2LMHeadModel: its lm_head is a tied copy of transformer.wte
    compress_(gpt2, LayerRule(block_size=4, n_centroids=16))
    hf.save_pretrained(gpt2, tmp_path / "lm")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        base = tf.AutoModel.from_pretrained(str(tmp_path / "lm"))
        assert type(base) is tf.GPT2Model and rel_err(base(ids).last_hidden_state, gpt2.transformer(ids).last_hidden_state) < 1e-3


def test_saving_a_model_with_nothing_compressed_warns(tmp_path, caplog):
    model = build("gpt2").eval()
    quantize_(model, QuantNoiseConfig(scheme="pq", p=0.1, block_size=4, n_centroids=16))
    with caplog.at_level("WARNING"):
        hf.save_pretrained(model, tmp_path / "dense")
    assert "no compressed layer (compressed_layers: 0)" in caplog.text and "compress_" in caplog.text
    caplog.clear()
    unquantize_(model)
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "plain")  # transformers' own verb: a plain model, saved as transformers does
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert torch.equal(tf.GPT2LMHeadModel.from_pretrained(str(tmp_path / "plain")).transformer.wte.weight,
                       model.transformer.wte.weight)


def test_a_head_class_loads_the_base_of_another_folder_its_head_tied_or_newly_initialized(tmp_path, caplog):
    config = CONFIGS["gpt2"]()
    torch.manual_seed(0)
    base, lm = tf.GPT2Model(config).eval(), build("gpt2").eval()
    for model, name in ((base, "base"), (lm, "lm")):
        compress_(model, LayerRule(block_size=4, n_centroids=16))
        hf.save_pretrained(model, tmp_path / name)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        for load in (lambda d, cls: cls.from_pretrained(str(d)), lambda d, cls: hf.from_pretrained(d, model_class=cls)):
            head = load(tmp_path / "base", tf.GPT2LMHeadModel)  # lm_head tied to the stored wte: a runtime alias
            hidden = head.transformer(ids).last_hidden_state
            assert rel_err(hidden, base(ids).last_hidden_state) < 1e-3
            assert type(head.lm_head).__name__ == "CodesLinear"
            assert rel_err(head(ids).logits, hidden @ head.transformer.wte.weight.t()) < 1e-5
            caplog.clear()
            with caplog.at_level("WARNING"):
                score = load(tmp_path / "lm", tf.GPT2ForSequenceClassification)  # lm_head left out, score new
            assert "newly initialized: ['score.weight']" in caplog.text
            assert rel_err(score.transformer(ids).last_hidden_state, lm.transformer(ids).last_hidden_state) < 1e-3
            assert score(ids).logits.shape == (1, 2) and bool(torch.isfinite(score(ids).logits).all())


def test_another_task_of_the_same_base_loads_with_the_unused_and_new_tensors_named(tmp_path, caplog):
    model = bert_classifier()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    folder = hf.save_pretrained(model, tmp_path / "cls")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad(), caplog.at_level("WARNING"):
        masked = tf.BertForMaskedLM.from_pretrained(str(folder))  # no pooler, another head: its decoder tied
        assert rel_err(masked.bert(ids).last_hidden_state, model.bert(ids).last_hidden_state) < 1e-2
        assert type(masked.cls.predictions.decoder).__name__ == "CodesLinear" and masked(ids).logits.shape == (1, 6, 96)
    assert "not used by BertForMaskedLM (another task's head): ['bert.pooler.dense.bias'" in caplog.text
    assert "newly initialized: ['cls.predictions.bias'" in caplog.text


def test_the_model_card_is_written_but_never_over_the_users_own(tmp_path):
    model = build("gpt2").eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    folder = hf.save_pretrained(model, tmp_path / "a")
    card = (folder / "README.md").read_text()
    assert "tags:\n- quantnoise\n" in card and "compression x" in card and "lm_head.weight" in card
    hf.save_pretrained(model, folder)  # its own card: rewritten
    (folder / "README.md").write_text("# my model\n")
    hf.save_pretrained(model, folder)
    assert (folder / "README.md").read_text() == "# my model\n"


def test_t5s_one_embedding_under_three_names_runs_compressed_under_all(tmp_path, caplog):
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(config).eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    folder = hf.save_pretrained(model, tmp_path / "t5")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad(), caplog.at_level("WARNING"):
        want = model(input_ids=ids, decoder_input_ids=ids).logits
        for loaded in (hf.from_pretrained(folder), tf.AutoModelForSeq2SeqLM.from_pretrained(str(folder))):
            assert loaded.encoder.embed_tokens is loaded.shared and loaded.decoder.embed_tokens is loaded.shared
            assert type(loaded.shared).__name__ == "CodesEmbedding"
            assert type(loaded.lm_head).__name__ == "CodesLinear"  # tied: computes from the shared codes
            assert loaded.lm_head.codes.data_ptr() == loaded.shared.codes.data_ptr()
            assert rel_err(loaded(input_ids=ids, decoder_input_ids=ids).logits, want) < 1e-3
            loaded.save_pretrained(tmp_path / "again")
            assert same_qnz(tmp_path / "again" / "model.safetensors", folder / "model.safetensors")
    assert "decoding" not in caplog.text
    # fill_model_ alone (no hf-side workaround: quantnoise.load_qnz, the path outside quantnoise.hf) does the same
    from quantnoise import load_qnz
    with torch.device("meta"):
        fresh = tf.T5ForConditionalGeneration(config)
    fresh.tie_weights()
    load_qnz(folder / "model.safetensors", fresh)
    assert fresh.encoder.embed_tokens is fresh.shared and fresh.decoder.embed_tokens is fresh.shared
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, decoder_input_ids=ids).logits,
                           hf.from_pretrained(folder)(input_ids=ids, decoder_input_ids=ids).logits)


def test_model_save_pretrained_writes_the_model_card_but_never_over_the_users_own(tmp_path):
    model = build("gpt2").eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    model.save_pretrained(tmp_path / "theirs")  # transformers' own verb
    hf.save_pretrained(model, tmp_path / "ours")
    card = (tmp_path / "theirs" / "README.md").read_text()
    assert card == (tmp_path / "ours" / "README.md").read_text()  # the same card, inspect's summary in it
    assert "quantnoise inspect model.safetensors" in card and "compression x" in card and "lm_head.weight" in card
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "theirs"))
    for again in (loaded, hf.from_pretrained(tmp_path / "theirs")):  # a loaded model re-saves with its card
        again.save_pretrained(tmp_path / "again")
        assert (tmp_path / "again" / "README.md").read_text() == card
    (tmp_path / "again" / "README.md").write_text("# my model\n")
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == "# my model\n"
    plain = build("gpt2").eval()
    quantize_(plain, QuantNoiseConfig(scheme="pq", p=0.1, block_size=4, n_centroids=16))  # quantnoise met it
    unquantize_(plain)
    plain.save_pretrained(tmp_path / "plain")  # nothing compressed: saved as transformers saves it, no card
    assert not (tmp_path / "plain" / "README.md").exists()


@pytest.fixture
def hub(monkeypatch):
    """The Hugging Face Hub's side of push_to_hub, offline: {repo: {file: bytes}} of what transformers uploads,
    and {repo: card text} of the cards repos already have (transformers loads a repo's card to tag it)."""
    import huggingface_hub
    import transformers.utils.hub as tf_hub
    from huggingface_hub.utils import EntryNotFoundError

    uploads, cards = {}, {}

    def create_commit(repo_id, operations, **kwargs):
        uploads[repo_id] = {op.path_in_repo: pathlib.Path(op.path_or_fileobj).read_bytes() for op in operations}

    def load_card(repo_id, **kwargs):
        if repo_id not in cards:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return huggingface_hub.ModelCard(cards[repo_id])

    monkeypatch.setattr(tf_hub.PushToHubMixin, "_create_repo", lambda self, repo_id, **kwargs: repo_id)
    monkeypatch.setattr(tf_hub, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda cls, repo_id, **kw: load_card(repo_id, **kw)))
    return uploads, cards


def test_push_to_hub_uploads_the_quantnoise_folder_with_its_model_card(tmp_path, hub, monkeypatch):
    uploads, cards = hub
    monkeypatch.chdir(tmp_path)
    model = build("gpt2").eval()
    compress_(model, LayerRule(block_size=4, n_centroids=16))
    ours = hf.save_pretrained(model, tmp_path / "ours")
    model.push_to_hub("me/gpt2-pq", tags=["my-tag"])  # a new repo: transformers' empty template is replaced
    model.save_pretrained(str(tmp_path / "pushed"), push_to_hub=True, repo_id="me/gpt2-pq2")
    for repo in ("me/gpt2-pq", "me/gpt2-pq2"):
        files = uploads[repo]
        assert {"config.json", "model.safetensors", "README.md"} <= set(files), repo
        (tmp_path / "got.safetensors").write_bytes(files["model.safetensors"])
        assert same_qnz(tmp_path / "got.safetensors", ours / "model.safetensors"), repo
        card = files["README.md"].decode()
        assert "quantnoise inspect model.safetensors" in card and "compression x" in card, card
        assert "automatically generated" not in card
        assert json.loads(files["config.json"])["quantization_config"]["compressed_layers"] == 10
    assert '- "my-tag"' in uploads["me/gpt2-pq"]["README.md"].decode()  # the template's tags are kept
    assert (tmp_path / "pushed" / "README.md").read_bytes() == uploads["me/gpt2-pq2"]["README.md"]
    cards["me/mine"] = "---\nlicense: mit\n---\n\n# My own card\n"  # a repo with a card of its own: kept, as transformers keeps it
    model.push_to_hub("me/mine")
    card = uploads["me/mine"]["README.md"].decode()
    assert "# My own card" in card and "quantnoise inspect" not in card
