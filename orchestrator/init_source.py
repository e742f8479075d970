"""`lmctl launch --init-from SOURCE`: continued pretraining from another run or a Hugging Face checkpoint.

SOURCE is a run of this runs folder (`dev`, or `dev@200` for a committed step), a Hugging Face Llama folder
(config.json, safetensors, tokenizer.json) or a hub model id. It decides the model's shape (every field but
seq_len, the context trained on, which stays the preset's unless overridden) and the tokenizer the data is
staged with; the workers load its weights before the first step (model/init_from.py). Everything after that
is a run like any other: resume, export and evals work the same.
"""

from __future__ import annotations

from pathlib import Path

from model.config import RunSpec, validate
from model.errors import ConfigError
from model.init_from import HF

SHAPE_KEYS = "model."  # overrides that --init-from decides, but for model.seq_len


def with_init(spec: RunSpec, source: str, root: Path, overrides: list[str], cloud: bool) -> RunSpec:
    """`spec` built as SOURCE's model, its data staged with SOURCE's tokenizer, train.init_from set."""
    shaped = [o for o in overrides if o.startswith(SHAPE_KEYS) and not o.startswith("model.seq_len=")]
    if shaped:
        raise ConfigError(
            f"--override {shaped[0]}: with --init-from the model's shape is the source's; only model.seq_len "
            "may be set"
        )
    init, tokenizer = _resolve(source, root, cloud)
    _same_tokenizer_as_staged(spec, source, tokenizer)
    from model.init_from import source_config

    model = source_config(init).model_copy(update={"seq_len": spec.model.seq_len})
    data = {**spec.data.model_dump(), "tokenizer": tokenizer}
    return validate(
        {
            **spec.model_dump(),
            "model": model.model_dump(),
            "data": data,
            "train": {**spec.train.model_dump(), "init_from": init},
        }
    )


def _same_tokenizer_as_staged(spec: RunSpec, source: str, tokenizer: str) -> None:
    """Data already staged (--dataset <its URI>) must have been tokenized by SOURCE's tokenizer: the same ids
    mean the same text to the model it continues."""
    staged = [p for p in [spec.data.path, *(s.path for s in spec.data.mixture)] if p]
    if not staged:
        return
    from model.staged import staged_manifest
    from orchestrator.stage import load_given_tokenizer

    want = load_given_tokenizer(spec.data.model_copy(update={"tokenizer": tokenizer}), None).sha256
    for path in staged:
        if staged_manifest(path).tokenizer_sha256 != want:
            raise ConfigError(
                f"--init-from {source}: the staged dataset {path} was tokenized by another tokenizer than "
                "the source's; give the raw dataset (it is staged with the source's tokenizer)"
            )


def _resolve(source: str, root: Path, cloud: bool) -> tuple[str, str]:
    """(train.init_from, data.tokenizer) of what the user named."""
    from orchestrator import runs

    name, _, step = source.partition("@")
    if (root / name / runs.RUN_RECORD).is_file():
        return _run_source(runs.read_record(root / name), step, cloud)
    if Path(source).expanduser().is_dir():  # a cloud run's launch uploads it to its store (upload_folder)
        from model.import_hf import load_hf_tokenizer

        folder = Path(source).expanduser().resolve()
        load_hf_tokenizer(folder)  # a tokenizer the data cannot be staged with fails here, not on a pod
        return f"{HF}{folder}", f"{HF}{folder}"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return f"{HF}{source}", f"{HF}{source}"
    raise ConfigError(
        f"--init-from {source}: not a run in {root} (lmctl status lists them), a Hugging Face model folder, "
        "or a hub id such as HuggingFaceTB/SmolLM2-135M"
    )


def _run_source(record, step: str, cloud: bool) -> tuple[str, str]:
    """A run's committed checkpoint (the newest, or `step`) and its staged data's tokenizer."""
    from model.checkpoint import Checkpointer

    ckpt = Checkpointer(record.checkpoints)
    steps = ckpt.committed_steps()
    if step and not step.isdigit():
        raise ConfigError(f"--init-from {record.name}@{step}: the step must be a whole number")
    chosen = int(step) if step else (steps[-1] if steps else None)
    if chosen not in steps:
        have = f"committed steps: {', '.join(map(str, steps))}" if steps else "it has no committed checkpoint"
        raise ConfigError(f"--init-from {record.name}@{chosen}: not a committed checkpoint; {have}")
    if cloud and "://" not in str(record.checkpoints).removeprefix("file://"):
        raise ConfigError(
            f"--init-from {record.name}: its checkpoints are on this machine ({record.checkpoints}); a cloud "
            "run needs a source whose checkpoints are in a store (a run launched with --store s3://...)"
        )
    _, meta = ckpt.load(chosen, keys=[])
    data = meta["data"]["path"]
    return f"{record.checkpoints}@{chosen}", f"{data.rstrip('/')}/tokenizer.json"


def upload_folder(spec: RunSpec, store_uri: str, name: str) -> RunSpec:
    """A cloud run started from a Hugging Face folder on this machine: its files (config.json, safetensors,
    tokenizer.json) put in the run's store at runs/<name>/init/, where the pods read them (each upload
    verified); train.init_from and data.tokenizer then name that copy."""
    from model.store import open_store
    from orchestrator import runs

    source = spec.train.init_from or ""
    folder = Path(source.removeprefix(HF))
    if not source.startswith(HF) or not folder.is_dir():
        return spec
    prefix = runs.store_key(name, "init")
    store = open_store(store_uri)
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            store.put_file(path, f"{prefix}/{path.name}")
    tokenizer = {"tokenizer": f"{store.url(prefix)}/tokenizer.json"} if spec.data.tokenizer == source else {}
    init = {"init_from": f"{HF}{store.url(prefix)}"}
    return spec.model_copy(
        update={"data": spec.data.model_copy(update=tokenizer), "train": spec.train.model_copy(update=init)}
    )
