"""Streaming access to model checkpoints: a folder with one or more .safetensors shards.

`Checkpoint` indexes every tensor's name, dtype and shape from the shard headers alone.
`rewrite` produces a copy of a checkpoint tensor by tensor (one shard open, one tensor in
memory at a time), keeping the shard layout and index and copying the folder's other files.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import json
import os
import queue
import shutil
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import paths, refs, safetensors_io
from .errors import FormatError, HubError
from .safetensors_io import SafetensorsFile, TensorInfo

INDEX_SUFFIX = ".safetensors.index.json"
# a model folder: config, weights, tokenizer, chat template, remote code; no .bin/.h5/.msgpack/onnx
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")


def fetch_model(ref: refs.HubRef, components: Sequence[str] = ()) -> str:
    """Download a model folder's config, safetensors weights and tokenizer (no .bin, no nested
    folders); for a diffusers pipeline (model_index.json) also those of the `components` folders."""
    pre = ref.subfolder + "/" if ref.subfolder else ""
    snap = refs.snapshot(ref, [pre + p for p in MODEL_FILES], ignore=[pre + "*/*"])
    folder = os.path.join(snap, *pre.split("/"))
    if components and os.path.isfile(os.path.join(folder, "model_index.json")):
        files = set(refs.repo_files(ref, snap))
        wanted = [f for f in sorted(files) if _pipeline_file(f[len(pre):], files, pre, components)] if files else []
        if wanted:
            refs.snapshot(ref, wanted)
    if not os.path.isdir(folder):
        raise HubError(f"{ref}: no such folder in the repository")
    return folder


def _pipeline_file(rel: str, files: set, pre: str, components: Sequence[str]) -> bool:
    """Config and weights of the pipeline components LoRAs target (unet/, text_encoder*/, transformer/);
    a precision variant (`x.fp16.safetensors`) only when there is no plain `x.safetensors`."""
    comp, _, name = rel.partition("/")
    if comp not in components or "/" in name or not any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILES):
        return False
    stem, _, ext = name.rpartition(".")
    plain = stem.rpartition(".")[0] + "." + ext if "." in stem else None
    return plain is None or f"{pre}{comp}/{plain}" not in files


def model_path(ref, components: Sequence[str] = ()) -> str:
    """The local model folder or file `ref` names (a Hub reference is downloaded, see fetch_model)."""
    return refs.existing_path(ref, functools.partial(fetch_model, components=tuple(components)))


class Checkpoint:
    """A model folder (or a single .safetensors file), read lazily."""

    def __init__(self, path: str):
        path = os.path.abspath(model_path(path))  # also a Hub reference
        self.index_file: Optional[str] = None
        self.index: Optional[dict] = None
        self.single_file = os.path.isfile(path)
        if self.single_file:
            if not path.endswith(".safetensors"):
                raise FormatError(f"{path}: expected a .safetensors file or a model folder")
            self.folder, self.shards = os.path.dirname(path), [os.path.basename(path)]
        else:
            self.folder = path
            self.shards = self._find_shards()
        self.infos: Dict[str, TensorInfo] = {}
        self.shard_of: Dict[str, str] = {}
        for shard in self.shards:
            with SafetensorsFile(os.path.join(self.folder, shard)) as f:
                for name, info in f.tensors.items():
                    if name in self.infos:
                        raise FormatError(f"{self.folder}: tensor {name} appears in two shards")
                    self.infos[name], self.shard_of[name] = info, shard
        if self.index is not None:
            if not isinstance(self.index.get("metadata") or {}, dict):
                raise FormatError(f"{self.index_file}: its metadata is not a JSON object")
            mapped = self.index.get("weight_map", {})
            if set(mapped) != set(self.infos) or any(self.shard_of[k] != v for k, v in mapped.items()):
                raise FormatError(f"{self.index_file}: weight_map disagrees with the shard files")

    def _find_shards(self) -> List[str]:
        indexes = sorted(glob.glob(os.path.join(self.folder, "*" + INDEX_SUFFIX)))
        if len(indexes) > 1:
            raise FormatError(f"{self.folder}: several shard indexes ({', '.join(map(os.path.basename, indexes))})")
        if indexes:
            self.index_file = indexes[0]
            try:
                with paths.open_input(self.index_file, "r", encoding="utf-8") as f:
                    self.index = json.load(f)
                shards = sorted(set(self.index["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise FormatError(f"{self.index_file}: not a valid shard index ({e.__class__.__name__})") from None
            for s in shards:
                if (not isinstance(s, str) or os.path.basename(s) != s
                        or not os.path.isfile(os.path.join(self.folder, s))):
                    raise FormatError(f"{self.index_file}: shard {s!r} is missing")
            return shards
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.folder, "*.safetensors")))
        if len(files) == 1:
            return files
        if not files:
            if glob.glob(os.path.join(self.folder, "*.bin")):
                raise FormatError(f"{self.folder}: only .bin weights found; loratools reads safetensors checkpoints "
                                  "(convert with `save_pretrained(..., safe_serialization=True)`)")
            raise FormatError(f"{self.folder}: no .safetensors weights found "
                              "(expected model.safetensors or shards + index)")
        raise FormatError(f"{self.folder}: several .safetensors files and no index: {', '.join(files)}")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    @property
    def weight_files(self) -> List[str]:
        files = list(self.shards)
        if self.index_file:
            files.append(os.path.basename(self.index_file))
        return files

    def read(self, name: str) -> torch.Tensor:
        with SafetensorsFile(os.path.join(self.folder, self.shard_of[name])) as f:
            return f.read(name)

    def read_many(self, names) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) for each of `names` held here, one shard open at a time and one reused read
        buffer: a tensor is valid only until the next one is yielded."""
        wanted = {n for n in names if n in self.infos}
        scratch = safetensors_io.ScratchBuffer()
        for shard in self.shards:
            todo = [n for n in self.infos if n in wanted and self.shard_of[n] == shard]
            if todo:
                with SafetensorsFile(os.path.join(self.folder, shard)) as f:
                    for name in todo:
                        yield name, f.read(name, scratch)


# weights in other formats that a merge does not touch: copied, they would hand out the unmerged
# model (`from_pretrained(out, use_safetensors=False)`, `--push`); never copied, listed instead
UNMERGED_WEIGHTS = ("pytorch_model*.bin", "model*.bin", "*.bin.index.json", "*.pth", "*.pt", "*.ckpt", "*.onnx",
                    "*.onnx_data", "*.onnx.data", "*.gguf", "*.msgpack", "*.msgpack.index.json", "*.h5",
                    "*.h5.index.json", "*.tflite", "*.mlmodel", "*.engine", "*.plan")
UNMERGED_FOLDERS = ("original", "onnx", "openvino", "coreml", "tensorrt", "gguf")


def copy_other_files(src_folder: str, dst_folder: str, skip: List[str], nested_weights: bool = False) -> List[str]:
    """Copy config, tokenizer and everything else that is not a weight file. Returns what was
    deliberately not copied, one `name (why)` each: weights in other formats (unmerged), symbolic
    links that lead out of the folder (they could pull in any file on the machine, e.g. a secret
    that `--push` would upload) and anything that is not a regular file or folder (a FIFO or
    device would block or never end). Links inside the folder are copied as what they point to.
    `nested_weights`: subfolders hold weights of untouched components (a pipeline's vae/): keep them."""
    roots = [os.path.realpath(src_folder)]
    if refs.commit_of(src_folder):  # a Hub snapshot: its files are links into the repository's blobs/
        parts = os.path.abspath(src_folder).split(os.sep)
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        roots.append(os.path.realpath(os.sep.join(parts[:at] + ["blobs"])))
    left_out: List[str] = []
    _copy_tree(src_folder, dst_folder, roots, "", set(skip), left_out, nested_weights)
    return left_out


def _copy_tree(src: str, dst: str, roots: List[str], rel: str, skip: set, left_out: List[str],
               nested_weights: bool) -> None:
    for entry in sorted(os.listdir(src)):
        name = rel + entry
        if entry.startswith(".") or (not rel and entry in skip):
            continue
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.islink(s):
            target = os.path.realpath(s)
            if not any(os.path.commonpath([root, target]) == root for root in roots):
                left_out.append(f"{name} (a link out of the folder, to {target})")
                continue
        if os.path.isdir(s):
            if not rel and entry in UNMERGED_FOLDERS:
                left_out.append(f"{name}/ (weights that were not merged)")
                continue
            os.makedirs(d, exist_ok=True)
            _copy_tree(s, d, roots, name + "/", skip, left_out, nested_weights)
        elif (not rel or not nested_weights) and any(fnmatch.fnmatchcase(entry, p) for p in UNMERGED_WEIGHTS):
            left_out.append(f"{name} (weights that were not merged)")
        elif not paths.is_regular(s):
            left_out.append(f"{name} (not a regular file)")
        else:
            with paths.open_input(s) as fin, open(d, "wb") as fout:  # never blocks on a swapped-in FIFO
                shutil.copyfileobj(fin, fout)
            shutil.copystat(s, d)


# Rows of a weight merged at a time: small enough that a piece read into a worker's buffer is still
# in that core's cache when the kernel merges it and when it is written to the page cache (so the
# weight crosses memory once each way, as in a plain copy); big enough that per-piece costs vanish.
PIECE_BYTES = 2 << 20
MAX_WORKERS = 4  # past this a merge waits on the disk / page cache, not on the kernel

RowMerges = Callable[[str], Optional[Callable[[torch.Tensor, int], None]]]
Job = Callable[[safetensors_io.ScratchBuffer], None]


class _Workers:
    """Threads that run a shard's jobs: a piece of a weight (read, merge, write, all on one core in
    one buffer), a kernel-side copy of an untouched tensor, or the write of a tensor the caller
    transformed whole. Jobs write at fixed places of the output, so their order does not matter;
    the queue is bounded, so is the memory. File I/O and the merge kernel release the GIL.

    Each worker runs the kernel on one thread (torch's thread count is per thread once a thread
    has used it): `n` single-threaded workers keep `n` cores busy without OpenMP teams competing.
    The caller's own thread count is what is left (at least 1), for the tensors it transforms whole.
    """

    def __init__(self, n: int):
        # the error of the earliest submitted job that failed: jobs submitted before it still run, so the
        # error reported does not depend on which thread got there first
        self.error: Optional[BaseException] = None
        self.error_at = -1
        self.submitted = 0
        self.lock = threading.Lock()
        self.jobs: "queue.Queue" = queue.Queue(maxsize=2 * n)
        self.wholes: "queue.Queue" = queue.Queue()  # two grow-only buffers for whole tensors
        for _ in range(2):
            self.wholes.put(safetensors_io.ScratchBuffer())
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # what each worker takes on its first use of torch
        ready = threading.Barrier(n + 1)
        self.threads = [threading.Thread(target=self._run, args=(ready,), name=f"loratools-io-{i}", daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()
        ready.wait()
        torch.set_num_threads(max(1, self.threads_before - n))

    def _run(self, ready: threading.Barrier) -> None:
        torch.get_num_threads()  # fixes this thread's count at 1
        ready.wait()
        scratch = safetensors_io.ScratchBuffer()
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, buf, seq = item
            try:
                if self.error is None or seq < self.error_at:
                    job(scratch)
            except BaseException as e:  # reported to the caller on its next call
                with self.lock:
                    if self.error is None or seq < self.error_at:
                        self.error, self.error_at = e, seq
            finally:
                if buf is not None:
                    self.wholes.put(buf)

    def _check(self) -> None:
        if self.error is not None:
            self.stop()  # the jobs submitted before the failed one end first: the earliest error wins
            raise self.error

    def whole_buffer(self) -> safetensors_io.ScratchBuffer:
        """A buffer for a tensor transformed whole (waits until a write frees one)."""
        self._check()
        return self.wholes.get()

    def submit(self, job: Job, buf: Optional[safetensors_io.ScratchBuffer] = None) -> None:
        """Run `job(scratch)` on a worker; `buf` (if any) is freed after it."""
        self._check()
        self.jobs.put((job, buf, self.submitted))
        self.submitted += 1

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """All jobs done (their first error raised) when the block ends; stopped when it raises."""
        if exc_type is None:
            self.finish()
        else:
            self.stop()

    def finish(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        self._join()
        self._check()

    def stop(self) -> None:
        with self.lock:
            if self.error is None:
                self.error, self.error_at = RuntimeError("stopped"), -1
        while any(t.is_alive() for t in self.threads):
            try:
                self.jobs.put(None, timeout=0.1)
            except queue.Full:
                continue
        self._join()

    def _join(self) -> None:
        for t in self.threads:
            t.join()
        torch.set_num_threads(self.threads_before)


def rewrite_file(src: str, dst: str, transform: Callable[[str, torch.Tensor], torch.Tensor],
                 out_dtype: Callable[[str], torch.dtype], on_tensor: Optional[Callable[[str], None]] = None,
                 unchanged: Optional[Callable[[str], bool]] = None, row_merge: Optional[RowMerges] = None,
                 stream=None) -> int:
    """Stream one safetensors file through `transform` into `dst` (same names, order and metadata);
    see `rewrite`. Returns the bytes of tensor data written. `stream`: a `cuda_pipeline.DevicePipeline`
    that merges the changed tensors on a GPU instead (the one place a merge leaves the host)."""
    if stream is not None:
        return stream.rewrite_file(src, dst, transform, out_dtype, on_tensor, unchanged)
    with SafetensorsFile(src) as f:
        names = f.keys()
        entries = [(n, out_dtype(n), f.tensors[n].shape) for n in names]
        writer = safetensors_io.StreamingWriter(dst, entries, f.metadata or None)
        with writer, _Workers(max(1, min(torch.get_num_threads(), MAX_WORKERS))) as workers:
            for name in names:
                info = f.tensors[name]
                merge_rows = row_merge(name) if row_merge is not None else None
                if unchanged is not None and unchanged(name) and out_dtype(name) == info.dtype:
                    pos = writer.claim(name, info.dtype, info.shape)
                    workers.submit(functools.partial(_copy, writer, f, info, pos))
                elif merge_rows is not None and info.shape:
                    pos, row = writer.claim(name, info.dtype, info.shape), f.row_bytes(name)
                    step = max(1, PIECE_BYTES // max(row, 1))
                    for start in range(0, info.shape[0], step):
                        stop = min(info.shape[0], start + step)
                        workers.submit(functools.partial(_merge_piece, f, name, start, stop, merge_rows, writer,
                                                         pos + start * row))
                else:
                    buf = workers.whole_buffer()
                    out = transform(name, f.read(name, buf))
                    pos = writer.claim(name, out.dtype, out.shape)
                    workers.submit(functools.partial(_write, writer, pos, out), buf)
                if on_tensor:
                    on_tensor(name)
    return writer.data_size


def _merge_piece(f: SafetensorsFile, name: str, start: int, stop: int, merge_rows: Callable[[torch.Tensor, int], None],
                 writer: safetensors_io.StreamingWriter, pos: int, scratch: safetensors_io.ScratchBuffer) -> None:
    """Rows [start, stop) of a weight: the read, compute and write stages, in one buffer on one core."""
    piece = f.read_rows(name, start, stop, scratch)
    merge_rows(piece, start)
    writer.pwrite(pos, piece)


def _copy(writer: safetensors_io.StreamingWriter, f: SafetensorsFile, info: TensorInfo, pos: int,
          scratch: safetensors_io.ScratchBuffer) -> None:
    writer.copy_range(f.fileno(), f.data_start + info.begin, pos, info.end - info.begin)


def _write(writer: safetensors_io.StreamingWriter, pos: int, tensor: torch.Tensor,
           scratch: safetensors_io.ScratchBuffer) -> None:
    writer.pwrite(pos, tensor)


def rewrite(ckpt: Checkpoint, dst_folder: str,
            transform: Callable[[str, torch.Tensor], torch.Tensor],
            out_dtype: Callable[[str], torch.dtype],
            on_tensor: Optional[Callable[[str], None]] = None,
            copy_others: bool = True,
            unchanged: Optional[Callable[[str], bool]] = None, row_merge: Optional[RowMerges] = None,
            stream=None) -> List[str]:
    """Write `transform(name, tensor)` for every tensor into `dst_folder`, shard by shard.

    `out_dtype(name)` must say up front what dtype each output tensor will have, so the
    header can be written before the data. `on_tensor` is called after each tensor (progress).
    Tensors for which `unchanged(name)` is true (and whose dtype stays) are copied byte for byte
    without being read into memory. Tensors for which `row_merge(name)` gives a function are merged
    in place by it a few rows at a time instead of by `transform`. The tensor handed to `transform`
    lives in a reused buffer: it is valid only until `transform` returns (copy it to keep it). Returns what
    `copy_other_files` left out. `stream`: see `rewrite_file`.
    """
    total = 0
    for shard in ckpt.shards:
        total += rewrite_file(os.path.join(ckpt.folder, shard), os.path.join(dst_folder, shard),
                              transform, out_dtype, on_tensor, unchanged, row_merge, stream)
    if ckpt.index is not None:
        index = dict(ckpt.index)
        index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
        with open(os.path.join(dst_folder, os.path.basename(ckpt.index_file)), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
            fh.write("\n")
    if copy_others and not ckpt.single_file:  # a lone file's siblings are not part of the model
        return copy_other_files(ckpt.folder, dst_folder, ckpt.weight_files)
    return []
