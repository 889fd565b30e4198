"""DIR/generator is a standard peft adapter folder; ``popri export`` merges it into a plain transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from popri import checkpoint as ckpt
from popri.export import RunFolderError, check_generator, export_merged, load_run_generator
from tests.run_artifacts import finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return finished_run(tmp_path_factory.mktemp("export"), tiny_model_dir)


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(["Original Text Sample 1\nthe sea is wide"], return_tensors="pt")["input_ids"]


def _run_policy(run_dir: Path, model_dir: Path):
    """The run's policy as its last checkpoint holds it (base + adapter + optimizer), rebuilt in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popri.config import load_config
    from popri.dpo import LoraDPO

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dpo = LoraDPO(base, tokenizer, config=load_config(run_dir / "config.json").train)
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    dpo.load_state_dict(tensors["dpo"])
    return dpo.policy, tokenizer


def test_generator_folder_loads_with_plain_peft_and_equals_the_run_policy(run_dir, tiny_model_dir):
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gen = run_dir / "generator"
    adapter_config = json.loads((gen / "adapter_config.json").read_text())
    policy, tokenizer = _run_policy(run_dir, tiny_model_dir)

    # Execute: what a user does, with nothing of popri
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(gen)).eval()

    # Assert
    assert Path(adapter_config["base_model_name_or_path"]) == tiny_model_dir.resolve()
    assert (gen / "adapter_model.safetensors").stat().st_size > 0
    with torch.no_grad():
        expected = policy(input_ids=_ids(tokenizer)).logits
        got = loaded(input_ids=_ids(tokenizer)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad(), loaded.disable_adapter():
        base_logits = loaded(input_ids=_ids(tokenizer)).logits
    assert not torch.allclose(got, base_logits, atol=1e-4)  # the adapter was trained: the check can fail


def test_popri_loader_finds_the_base_from_the_manifest(run_dir, tiny_model_dir):
    # Prepare
    policy, tokenizer = _run_policy(run_dir, tiny_model_dir)

    # Execute
    model, loaded_tokenizer = load_run_generator(run_dir)
    manifest = check_generator(run_dir)

    # Assert
    assert manifest["base_model"] == str(tiny_model_dir)
    assert loaded_tokenizer.pad_token_id == loaded_tokenizer.eos_token_id
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)


def test_merged_export_loads_with_transformers_and_equals_the_adapter(run_dir, tiny_model_dir, tmp_path):
    # Prepare
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, tokenizer = _run_policy(run_dir, tiny_model_dir)
    out = tmp_path / "merged"

    # Execute
    export_merged(run_dir, out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(out)

    # Assert
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged_tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-4)
    assert "differentially private" in (out / "privacy-card.md").read_text()


def test_export_command_writes_the_merged_folder(run_dir, tmp_path):
    # Prepare
    from popri.cli import main

    out = tmp_path / "merged"

    # Execute
    rc = main(["export", "--run", str(run_dir), "--merged", str(out)])

    # Assert
    assert rc == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_export_refuses_a_non_empty_target_and_leaves_it_alone(run_dir, tmp_path):
    # Prepare
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    # Execute / Assert
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(run_dir, out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("no-generator", "generator: missing"),
        ("no-weights", "adapter_model.safetensors: missing"),
        ("torn-weights", "adapter_model.safetensors: corrupt"),
        ("bad-config", "adapter_config.json: corrupt"),
        ("no-manifest", "popri_generator.json: missing"),
    ],
)
def test_a_partial_or_corrupt_run_folder_is_refused_naming_the_file(run_dir, tmp_path, damage, reason):
    # Prepare: a copy of the finished run, damaged one way
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    gen = broken / "generator"
    if damage == "no-generator":
        shutil.rmtree(gen)
    elif damage == "no-weights":
        (gen / "adapter_model.safetensors").unlink()
    elif damage == "torn-weights":
        data = (gen / "adapter_model.safetensors").read_bytes()
        (gen / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad-config":
        (gen / "adapter_config.json").write_text("{not json")
    else:
        (gen / "popri_generator.json").unlink()

    # Execute
    with pytest.raises(RunFolderError) as err:
        export_merged(broken, tmp_path / "out")

    # Assert
    assert reason in str(err.value)
    assert str(broken) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_export_command_reports_a_broken_run_and_exits_2(tmp_path, caplog):
    # Prepare
    from popri.cli import main

    (tmp_path / "run").mkdir()

    # Execute
    rc = main(["export", "--run", str(tmp_path / "run"), "--merged", str(tmp_path / "out")])

    # Assert
    assert rc == 2
    assert "generator: missing" in caplog.text


def _with_manifest(run_dir: Path, tmp_path: Path, **changes: str) -> Path:
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(run_dir, run)
    path = run / "generator" / "popri_generator.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return run


def test_a_vanished_local_base_is_refused_with_what_to_do(run_dir, tmp_path):
    # Prepare: the run came from another machine whose base folder is not here
    gone = str(tmp_path / "elsewhere" / "my-model")
    run = _with_manifest(run_dir, tmp_path, base_model=gone, base_model_path=gone)

    # Execute / Assert
    with pytest.raises(RunFolderError, match="is gone; copy it back"):
        load_run_generator(run)


def test_the_packaged_base_is_converted_again_when_the_cache_was_cleared(
    run_dir, tmp_path, tiny_model_dir, monkeypatch
):
    # Prepare: the recorded cache folder is gone; the conversion (here a stand-in returning the tiny model) runs again
    import popri.assets

    asked: list[object] = []

    def convert(model: str, *, cache_dir: Path | None = None) -> Path:
        asked.append((model, cache_dir))
        return tiny_model_dir

    monkeypatch.setattr(popri.assets, "generator_dir", convert)
    run = _with_manifest(run_dir, tmp_path, base_model="smollm2", base_model_path=str(tmp_path / "cleared-cache"))

    # Execute
    model, _ = load_run_generator(run, cache_dir=tmp_path / "cache")

    # Assert
    assert asked == [("smollm2", tmp_path / "cache")]
    assert model.peft_config["default"].r == 16
