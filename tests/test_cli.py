"""quantnoise.cli in process: missing arguments, missing inputs, missing output folders and a full disk
give one line on stderr and a non-zero exit, never a traceback, and write nothing."""
import errno

import pytest
import torch

from quantnoise import cli, export
from quantnoise.checkpoint import save_checkpoint


def run_cli(capsys, *args):
    """(exit code, stderr lines) of ``quantnoise ARGS`` run in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = {"decoder.embed_tokens.weight": torch.randn(64, 16), "decoder.layers.0.fc1.weight": torch.randn(32, 16),
             "decoder.layers.0.fc1.bias": torch.randn(32)}
    save_checkpoint({"cfg": {"model": {"_name": "qn_transformer_lm_tiny"}}, "model": model,
                     "optimizer_history": [{"num_updates": 2}]}, tmp_path / "c.pt")
    return tmp_path / "c.pt"


@pytest.mark.parametrize("args", [[], ["quantize"], ["quantize", "c.pt"], ["export"], ["export", "q.pt"],
                                  ["inspect"], ["decompress"], ["decompress", "m.qnz"], ["sweep-report"],
                                  ["sensitivity"], ["sensitivity", "c.pt"], ["no-such-command"]])
def test_a_command_without_its_arguments_is_a_usage_error(capsys, args):
    code, err = run_cli(capsys, *args)
    assert code == 2 and err and err[-1].startswith("quantnoise") and "error:" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_missing_inputs_are_one_line(tmp_path, capsys, ckpt):
    cases = [("quantize", tmp_path / "none.pt", "-o", tmp_path / "q.pt"),
             ("quantize", ckpt, "-o", tmp_path / "q.pt", "--config", tmp_path / "none.yaml"),
             ("export", tmp_path / "none.pt", "-o", tmp_path / "m.qnz"),
             ("inspect", tmp_path / "none.qnz"),
             ("decompress", tmp_path / "none.qnz", "-o", tmp_path / "d.pt"),
             ("sweep-report", tmp_path / "none"),
             ("sensitivity", tmp_path / "none.pt", tmp_path)]
    for args in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and len(err) == 1 and str(args[1] if "--config" not in args else args[-1]) in err[0], (args, err)
        assert "does not exist" in err[0] or "is not a folder" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_an_output_folder_that_does_not_exist_is_one_line(tmp_path, capsys, ckpt):
    assert run_cli(capsys, "quantize", ckpt, "-o", tmp_path / "q.pt", "--centroids", "8")[0] == 0
    assert run_cli(capsys, "export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")[0] == 0
    missing = tmp_path / "no" / "such"
    for args in (("quantize", ckpt, "-o", missing / "q.pt"), ("export", tmp_path / "q.pt", "-o", missing / "m.qnz"),
                 ("decompress", tmp_path / "m.qnz", "-o", missing / "d.pt")):
        code, err = run_cli(capsys, *args)
        assert code == 2 and len(err) == 1 and f"output folder {missing} does not exist" in err[0], err
    assert not (tmp_path / "no").exists()


def test_a_full_disk_during_export_keeps_the_old_file(tmp_path, capsys, ckpt, monkeypatch):
    assert run_cli(capsys, "quantize", ckpt, "-o", tmp_path / "q.pt", "--centroids", "8")[0] == 0
    assert run_cli(capsys, "export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")[0] == 0
    before = (tmp_path / "m.qnz").read_bytes()

    def full_disk(path, blob, chunk=1 << 24):
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_bytes", full_disk)
    code, err = run_cli(capsys, "export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz", "--rest", "float32")
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert (tmp_path / "m.qnz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.qnz", "q.pt"]  # no temp file left
    monkeypatch.setattr(torch, "save", lambda *a, **k: full_disk(a[1], b"x" * 99))
    code, err = run_cli(capsys, "quantize", ckpt, "-o", tmp_path / "q.pt", "--centroids", "4")
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.qnz", "q.pt"]
    assert torch.load(tmp_path / "q.pt", weights_only=True)["model"]["decoder.embed_tokens.centroids"].shape[0] == 8


def test_a_bad_plan_is_one_line(tmp_path, capsys, ckpt):
    (tmp_path / "plan.yaml").write_text("stages:\n  - {pattern: 123}\n")
    code, err = run_cli(capsys, "quantize", ckpt, "-o", tmp_path / "q.pt", "--config", tmp_path / "plan.yaml")
    assert code == 2 and len(err) == 1 and "pattern=123" in err[0], err


def test_quantize_int16_codes_and_decompress_arch(tmp_path, capsys, ckpt):
    """--centroids > 256 gives int16 codes all the way; decompress --arch writes the name asked for."""
    code, err = run_cli(capsys, "quantize", ckpt, "-o", tmp_path / "q.pt", "--centroids", "300", "--block-size", "2",
                        "--include", "embed_tokens")
    assert code == 0, err
    q = torch.load(tmp_path / "q.pt", weights_only=True)
    assert q["model"]["decoder.embed_tokens.codes"].dtype == torch.int16  # 512 blocks, 300 centroids
    assert q["model"]["decoder.embed_tokens.centroids"].shape == (300, 2)
    assert run_cli(capsys, "export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")[0] == 0
    assert run_cli(capsys, "decompress", tmp_path / "m.qnz", "-o", tmp_path / "d.pt")[0] == 0
    assert run_cli(capsys, "decompress", tmp_path / "m.qnz", "-o", tmp_path / "big.pt", "--arch", "transformer_lm_big")[0] == 0
    d, big = (torch.load(tmp_path / n, weights_only=True) for n in ("d.pt", "big.pt"))
    assert d["cfg"]["model"]["_name"] == "transformer_lm" and big["cfg"]["model"]["_name"] == "transformer_lm_big"
    want = q["model"]["decoder.embed_tokens.centroids"].half().float()[q["model"]["decoder.embed_tokens.codes"].long()]
    for out in (d, big):
        assert torch.equal(out["model"]["decoder.embed_tokens.weight"], want.reshape(64, 16))
