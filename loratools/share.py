"""Share on the Hugging Face Hub: pull adapters, push adapters and merged models with a model card.

`pull` downloads only the adapter's files (the patterns come from the format registry) and can copy
them out of the cache.

The files go up exactly as they are on disk (a pushed adapter pulls back bit for bit), plus a
README.md model card whose metadata says what the repository is: `base_model`, `library_name`
(`peft` for PEFT adapters), tags `lora` and `base_model:adapter:<base>`, and how it was made.

How an adapter was made is read from its safetensors metadata key `loratools` (provenance.KEY): a
JSON object that blend / resize / extract write, e.g. {"operation": "blend", "method": "svd",
"inputs": [...], "weights": [...], "rank": 16}; merged models get theirs from `merge --push`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

from . import paths
from . import provenance as provenance_record
from . import refs
from .adapter import LoraAdapter
from .archs import COMPONENTS
from .atomic import atomic_output, check_output
from .checkpoint import fetch_model
from .errors import HubError, InputNotFoundError, NonFiniteError, UsageError
from .formats import adapter_files, fetch_adapter, hub_adapter_files, read_adapter
from .ops import all_finite
from .report import Report


@dataclass
class PushPlan:
    repo_id: str
    files: Dict[str, str]  # path in repo -> local file
    card: str
    kind: str  # "adapter" or "model"
    revision: Optional[str] = None
    summary: Dict[str, object] = field(default_factory=dict)
    card_source: str = "(model card, generated)"

    def __post_init__(self):  # a branch to push to is checked as strictly as one to pull from
        if self.revision is not None:
            refs.check_revision(self.repo_id, self.revision)

    def rows(self) -> List[List[object]]:
        return [[p, os.path.getsize(src), src] for p, src in sorted(self.files.items())] + \
               [["README.md", len(self.card.encode("utf-8")), self.card_source]]


def provenance(adapter: LoraAdapter) -> Optional[dict]:
    return provenance_record.read(adapter.metadata)


def check_adapter(adapter: LoraAdapter, where: str) -> None:
    """The checks a push needs beyond what reading did (shapes): something to push, all finite."""
    if len(adapter) == 0 and not adapter.extra:
        raise UsageError(f"{where}: the adapter has no modules; nothing to push")
    for m in adapter:
        for t in (m.down, m.up, m.magnitude, m.mid):
            if t is not None and t.is_floating_point() and not all_finite(t):
                raise NonFiniteError(f"{where}: module {m.name} has NaN or Inf values; refusing to push it")


def _yaml_card(data, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def _made_with(info: Optional[dict]) -> str:
    if not info:
        return ""
    lines = ["## How it was made", ""]
    for key, value in info.items():
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines) + "\n"


def adapter_card(adapter: LoraAdapter, repo_id: str, base_model: Optional[str] = None) -> str:
    from huggingface_hub import ModelCardData

    base = base_model or refs.hub_id(adapter.base_model)
    info = provenance(adapter)
    tags = ["lora", "loratools"] + ([f"base_model:adapter:{base}"] if base else [])
    if info and info.get("operation"):
        tags.append(str(info["operation"]))
    data = ModelCardData(base_model=base, library_name="peft" if adapter.format == "peft" else None, tags=tags)
    rank = adapter.rank_range
    dtype = str(adapter.dtype()).replace("torch.", "")
    usage = (f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\")\n```"
             if adapter.format == "peft" else f"```bash\nloratools pull {repo_id} -o adapter\n```")
    body = f"""
# {repo_id.split('/')[-1]}

A LoRA adapter{f' for [{base}](https://huggingface.co/{base})' if base else ''}, in {adapter.format} format.

| modules | rank | parameters | dtype | DoRA |
|---|---|---|---|---|
| {len(adapter)} | {rank} | {adapter.num_parameters():,} | {dtype} | {'yes' if adapter.is_dora else 'no'} |

{_made_with(info)}
## Use

{usage}

Uploaded with [loratools](https://github.com/loratools/loratools).
"""
    return _yaml_card(data, body)


def _shown(ref: str) -> str:
    """Hub references as given; local paths by their last component (a card should not leak local paths)."""
    ref = os.fspath(ref)
    return ref if not os.path.exists(ref) else os.path.basename(os.path.normpath(ref))


def merged_card(repo_id: str, base: str, adapters: Sequence[str], weights: Sequence[float],
                folder: str) -> str:
    from huggingface_hub import ModelCardData

    base_id = refs.hub_id(base)
    library = None
    try:
        with paths.open_input(os.path.join(folder, "config.json"), "r", encoding="utf-8") as f:
            library = "transformers" if json.load(f).get("architectures") else None
    except (OSError, ValueError):
        pass
    data = ModelCardData(base_model=base_id, library_name=library, tags=["loratools", "lora", "merge"])
    info = {"operation": "merge (W' = W + Σ w·s·B·A, accumulated in fp32)", "base": _shown(base),
            "adapters": [f"{_shown(a)} (weight {w:g})" for a, w in zip(adapters, weights)]}
    body = f"""
# {repo_id.split('/')[-1]}

{base_id or _shown(base)} with {len(adapters)} LoRA adapter(s) merged into its weights.

{_made_with(info)}
Merged with [loratools](https://github.com/loratools/loratools).
"""
    return _yaml_card(data, body)


CARD_MODES = ("merge", "replace")


def keep_readme(card: str, readme: str) -> str:
    """The user's README text with the generated card's metadata merged into its YAML block (the
    user's own non-empty values win; tags are joined)."""
    from huggingface_hub import ModelCard, ModelCardData

    ours, theirs = ModelCard(card), ModelCard(readme, ignore_metadata_errors=True)
    mine, yours = ours.data.to_dict(), theirs.data.to_dict()
    merged = {**mine, **{k: v for k, v in yours.items() if v not in (None, "", [], {})}}  # blanks (PEFT's stub)
    tags = list(dict.fromkeys(list(mine.get("tags") or []) + list(yours.get("tags") or [])))
    if tags:
        merged["tags"] = tags
    return _yaml_card(ModelCardData(**merged), theirs.text)


def plan_adapter_push(adapter_ref: str, repo_id: str, revision: Optional[str] = None,
                      base_model: Optional[str] = None, card: str = "merge") -> PushPlan:
    """Read and check the adapter (local or on the Hub), list its files, write its card. No network
    unless the adapter itself is a Hub reference. card: "merge" keeps the adapter folder's own
    README.md (with the generated metadata merged into it), "replace" writes the generated card."""
    if card not in CARD_MODES:
        raise UsageError(f"unknown card mode {card!r}: use one of {', '.join(CARD_MODES)}")
    if revision is not None:
        refs.check_revision(repo_id, revision)  # before any work (PushPlan checks it again)
    path = refs.local_path(adapter_ref, fetch_adapter)
    adapter = read_adapter(path)
    check_adapter(adapter, adapter_ref)
    files = adapter_files(path, adapter)
    summary = {"format": adapter.format, "modules": len(adapter), "ranks": sorted(set(adapter.ranks))}
    text, source = adapter_card(adapter, repo_id, base_model), "(model card, generated)"
    readme = os.path.join(path, "README.md")
    if card == "merge" and os.path.isdir(path) and os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            text, source = keep_readme(text, f.read()), "(your README.md + generated metadata)"
    return PushPlan(repo_id, files, text, "adapter", revision, summary, source)


def plan_folder_push(folder: str, repo_id: str, card: str, revision: Optional[str] = None) -> PushPlan:
    """Every file in a model folder (recursively, hidden files and an old README.md excepted)."""
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"{folder}: no such folder")
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not name.startswith(".") and rel != "README.md":
                files[rel] = os.path.join(root, name)
    return PushPlan(repo_id, files, card, "model", revision)


def execute(plan: PushPlan, private: bool = False, commit_message: Optional[str] = None, create_pr: bool = False):
    """Upload the plan in one commit; returns huggingface_hub's CommitInfo."""
    message = commit_message or f"Upload {plan.kind} with loratools"
    return upload(plan.files, plan.repo_id, plan.card, private=private, revision=plan.revision,
                      commit_message=message, create_pr=create_pr)


@dataclass
class Pulled:
    path: str  # the adapter's folder or file (in the cache, or in the output folder)
    adapter: LoraAdapter
    files: Dict[str, str]  # name -> local file
    commit: Optional[str]


def pull_ref(ref, revision: Optional[str] = None) -> refs.HubRef:
    """`ref` (a refs.HubRef or `user/repo[@rev][/sub]`, always read as a Hub reference) at `revision`."""
    if not isinstance(ref, refs.HubRef):
        text = os.fspath(ref)
        ref = refs.parse_ref(text if text.startswith(refs.PREFIX) else refs.PREFIX + text)
    if revision:
        if ref.revision:
            raise UsageError("give the revision either as REPO_ID@REVISION or with --revision, not both")
        ref = replace(ref, revision=revision)
    return ref


@dataclass(repr=False)
class PullPlan(Report):
    """What `pull` would download (for --dry-run): the adapter's files and their sizes."""
    ref: str
    commit: str
    path: str  # the adapter's folder or file in the repository
    files: Dict[str, int]  # path in the repository -> bytes

    def summary(self) -> dict:
        return {"repo": self.ref, "commit": self.commit, "path": self.path, "files": len(self.files),
                "bytes": sum(self.files.values()), "dry_run": True}

    def to_dict(self) -> dict:
        return dict(self.summary(), files=self.files)


def plan_pull(ref, revision: Optional[str] = None) -> PullPlan:
    """The files `pull(ref)` would download, from the Hub's file listing (the same choice of files);
    downloads nothing and writes nothing, not even to the cache."""
    ref = pull_ref(ref, revision)
    commit, tree = refs.repo_tree(ref)
    where, files = (ref.subfolder, [ref.subfolder]) if ref.is_file else hub_adapter_files(ref, tree.__contains__,
                                                                                             lambda: list(tree))
    missing = [f for f in files if f not in tree]
    if missing:
        raise HubError(f"{ref}: no file {missing[0]} in the repository")
    return PullPlan(str(ref), commit, where, {f: tree[f] for f in files})


@paths.guarded
def pull(ref, output: Optional[str] = None, overwrite: bool = False, revision: Optional[str] = None) -> Pulled:
    """Download the adapter that Hub reference `ref` names (a refs.HubRef or `user/repo[@rev][/sub]`,
    always read as a Hub reference); with `output`, copy its files (real files, not cache symlinks)
    into that folder, atomically."""
    ref = pull_ref(ref, revision)
    if output is not None:
        check_output(output, overwrite)
    path = refs.local_path(refs.PREFIX + str(ref), fetch_adapter)
    adapter = read_adapter(path)
    files = adapter_files(path, adapter)
    commit = refs.commit_of(path)
    if output is None:
        return Pulled(path, adapter, files, commit)
    with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
        for name, src in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, name))
    out = os.path.abspath(output)
    files = {name: os.path.join(out, name) for name in files}
    return Pulled(out if os.path.isdir(path) else next(iter(files.values())), adapter, files, commit)


def check_online(what: str) -> None:
    if refs.settings()[2]:
        raise HubError(f"{what}: cannot push while HF_HUB_OFFLINE is set")


def api(token=None):
    from huggingface_hub import HfApi
    return HfApi(endpoint=refs.settings()[0], token=token)


def upload(folder_files: Dict[str, str], repo_id: str, card_text: str, private: bool = False,
           revision: Optional[str] = None, commit_message: Optional[str] = None, create_pr: bool = False):
    """Create the repository if needed and upload `{path_in_repo: local file}` + README.md in one commit."""
    from huggingface_hub import CommitOperationAdd

    check_online(repo_id)
    hf = api()
    with refs.hub_errors(repo_id, write=True):
        repo_id = hf.create_repo(repo_id, private=private or None, exist_ok=True).repo_id
        if revision and revision != "main" and not create_pr:
            hf.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in folder_files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
        return hf.create_commit(repo_id, ops, commit_message=commit_message or "Upload with loratools",
                                revision=revision, create_pr=create_pr)


def local_path(ref, kind: str = "adapter") -> str:
    """A local path for `ref`: itself when it is local (or not a Hub reference), else the downloaded
    snapshot folder (or file). kind: 'adapter' (adapter files only) or 'model' (config, safetensors
    weights, tokenizer; no .bin or nested folders). Integrators: call this before `open()`-ing a path
    that a user gave, where `read_adapter` / `Checkpoint` are not used."""
    if kind == "adapter":
        return refs.local_path(ref, fetch_adapter)
    if kind == "model":
        return refs.local_path(ref, functools.partial(fetch_model, components=COMPONENTS))
    raise ValueError(f"kind must be 'adapter' or 'model', not {kind!r}")
