"""Meta checkpoint directories: params.json, consolidated.NN.pth shards, and slicing them for any number of ranks.

A checkpoint with N shards loads into M model-parallel ranks for any N and M the shapes allow: each rank
reads, from memory-mapped shards, only the rows or columns it owns. Shards hold whole key/value heads, so
a Meta checkpoint never has more shards than key/value heads; ranks beyond that share replicated heads.
"""

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .model import ModelArgs
from .pages import release_pages

# Keys some Meta checkpoints carry that the model recomputes instead of loading.
IGNORED_KEYS = {"rope.freqs"}
# A quantized checkpoint says how in this file; each linear weight then comes with a `.scale` per output row.
QUANTIZATION_FILE = "quantization.json"
QUANTIZED_METHODS = ("int8",)
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
# The output projection, which a checkpoint may leave out (tied: the model uses the embedding matrix).
OUTPUT_KEY = "output.weight"
EMBEDDING_KEY = "tok_embeddings.weight"

COPY_BLOCK_BYTES = 32 << 20

# Meta's own (multiple_of, ffn_dim_multiplier) for the published Llama 3 shapes, by (dim, hidden size).
META_FFN_PARAMS = {
    (4096, 14336): (1024, 1.3),
    (8192, 28672): (4096, 1.3),
    (16384, 53248): (4096, 1.2),
    (2048, 8192): (256, 1.5),
    (3072, 8192): (256, 1.0),
}


def ffn_params(dim: int, hidden: int) -> dict:
    """`multiple_of` and (if needed) `ffn_dim_multiplier` with which Meta's rule gives SwiGLU hidden size `hidden`.

    Meta's published shapes get Meta's own values; others the simplest that fit: no multiplier, else one
    rounded to as few decimals as possible, with the largest power-of-two multiple_of that divides `hidden`.
    """
    if dim < 2 or hidden < 1:
        raise ValueError(f"a model of dim {dim} cannot have a SwiGLU hidden size of {hidden}")
    if (dim, hidden) in META_FFN_PARAMS:
        multiple_of, multiplier = META_FFN_PARAMS[dim, hidden]
        return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    base = int(2 * (4 * dim) / 3)
    multiples = [2**k for k in range((hidden & -hidden).bit_length() - 1, -1, -1)]
    # The last candidate puts int(multiplier * base) half a unit above `hidden`, which always rounds right.
    multipliers = [None, *(round(hidden / base, digits) for digits in range(1, 6)), (hidden + 0.5) / base]
    for multiplier in multipliers:
        for multiple_of in multiples:
            params = {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
            if ModelArgs(dim=dim, n_heads=1, **params).ffn_hidden_dim == hidden:
                return params if multiplier is not None else {"multiple_of": multiple_of}
    raise AssertionError(f"no Meta FFN parameters give hidden size {hidden} for dim {dim}")

Layout = Dict[str, Tuple[Tuple[int, ...], Optional[int]]]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message says what to do."""


def read_params(ckpt_dir: Path) -> dict:
    """The parsed params.json of a checkpoint directory."""
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist: pass --ckpt_dir with a downloaded model")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Meta checkpoint directory holds params.json and consolidated.NN.pth")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): download it again") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model hyperparameters")
    return params


def read_quantization(ckpt_dir: Path) -> Optional[str]:
    """The method a quantized checkpoint (see llama.quantize.write_quantized) was written with, else None."""
    path = Path(ckpt_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        method = json.loads(path.read_text()).get("method")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        method = None
    if method not in QUANTIZED_METHODS:
        raise CheckpointError(f"{path} names no quantization this repo reads ({', '.join(QUANTIZED_METHODS)}): write it again")
    return method


def shard_paths(ckpt_dir: Path) -> List[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in order; an error if none or if numbers are missing."""
    found = {}
    for path in Path(ckpt_dir).iterdir():
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise CheckpointError(f"no consolidated.NN.pth shards in {ckpt_dir}: download the checkpoint weights there")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise CheckpointError(f"{ckpt_dir} lacks {names}: download every shard of the checkpoint")
    return [found[i] for i in sorted(found)]


def linear_weight_keys(layout: Layout) -> List[str]:
    """The keys of the linear layers' weights (all matrices but the embedding)."""
    return [key for key, (shape, _) in layout.items() if len(shape) == 2 and not key.startswith("tok_embeddings")]


def scale_key(weight_key: str) -> str:
    """`layers.0.attention.wq.weight` -> `layers.0.attention.wq.scale`."""
    return weight_key[: -len("weight")] + "scale"


def parameter_layout(args: ModelArgs, quantized: bool = False) -> Layout:
    """Each parameter's full (unsharded) shape and the dimension model parallelism splits it on (None: replicated);
    with `quantized`, also each linear weight's per-row scales (split with the rows, or replicated)."""
    q_width, kv_width, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    layout: Layout = {
        "tok_embeddings.weight": ((args.vocab_size, args.dim), 0),
        "norm.weight": ((args.dim,), None),
        "output.weight": ((args.vocab_size, args.dim), 0),
    }
    for i in range(args.n_layers):
        layer = f"layers.{i}."
        layout.update(
            {
                layer + "attention.wq.weight": ((q_width, args.dim), 0),
                layer + "attention.wk.weight": ((kv_width, args.dim), 0),
                layer + "attention.wv.weight": ((kv_width, args.dim), 0),
                layer + "attention.wo.weight": ((args.dim, q_width), 1),
                layer + "feed_forward.w1.weight": ((hidden, args.dim), 0),
                layer + "feed_forward.w2.weight": ((args.dim, hidden), 1),
                layer + "feed_forward.w3.weight": ((hidden, args.dim), 0),
                layer + "attention_norm.weight": ((args.dim,), None),
                layer + "ffn_norm.weight": ((args.dim,), None),
            }
        )
    if quantized:
        for key in linear_weight_keys(layout):
            (rows, _), dim = layout[key]
            layout[scale_key(key)] = ((rows,), 0 if dim == 0 else None)
    return layout


def rank_range(key: str, size: int, args: ModelArgs, rank: int, world_size: int) -> Tuple[int, int]:
    """The [begin, end) of a split dimension of full length `size` that `rank` of `world_size` holds."""
    if key.endswith(("attention.wk.weight", "attention.wv.weight", "attention.wk.scale", "attention.wv.scale")) and (
        world_size > args.n_kv_heads
    ):
        head = rank * args.n_kv_heads // world_size  # one replicated key/value head per rank
        return head * args.head_dim, (head + 1) * args.head_dim
    if size % world_size:
        raise CheckpointError(
            f"{key} has {size} rows/columns, which do not split over {world_size} processes: "
            f"run with a number of processes that divides it"
        )
    part = size // world_size
    return rank * part, (rank + 1) * part


def _copy_releasing(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` in blocks of rows, releasing each block's memory-mapped source pages once copied."""
    row_bytes = src[0].numel() * src.element_size() if src.dim() > 1 else src.numel() * src.element_size()
    rows = max(1, COPY_BLOCK_BYTES // max(row_bytes, 1))
    for row in range(0, src.shape[0], rows):
        dst[row : row + rows].copy_(src[row : row + rows])
        release_pages(src[row : row + rows])


def _equal_releasing(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal(a, b) in blocks of rows, releasing each block of `a` (memory-mapped) once compared."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():  # one storage, as Meta's tied files save it
        return True
    rows = max(1, COPY_BLOCK_BYTES // max(a[0].numel() * a.element_size(), 1))
    for row in range(0, a.shape[0], rows):
        equal = torch.equal(a[row : row + rows], b[row : row + rows])
        release_pages(a[row : row + rows])
        if not equal:
            return False
    return True


class ShardedCheckpoint:
    """The memory-mapped shards of a Meta checkpoint, checked against its params and readable slice by slice."""

    def __init__(self, ckpt_dir: Path, args: ModelArgs):
        self.ckpt_dir = Path(ckpt_dir)
        self.args = args
        self.paths = shard_paths(self.ckpt_dir)
        self.shards = [self._load(path) for path in self.paths]
        self.quantization = read_quantization(self.ckpt_dir)
        self.layout = parameter_layout(args, quantized=self.quantization is not None)
        # No output.weight in any shard: the output projection is the embedding (quantized ones always have one).
        self.output_absent = not self.quantization and all(OUTPUT_KEY not in shard for shard in self.shards)
        self.stored_keys = [key for key in self.layout if not (self.output_absent and key == OUTPUT_KEY)]
        self._check_keys()
        for key in self.stored_keys:
            self._check_shapes(key)

    @functools.cached_property
    def tied_output(self) -> bool:
        """Whether the output projection is the embedding matrix: left out of the shards, or equal to it in every
        one (as in Meta's Llama 3.2 1B and 3B files). A model then holds the matrix once."""
        if self.output_absent:
            return True
        return not self.quantization and all(
            _equal_releasing(shard[OUTPUT_KEY], shard[EMBEDDING_KEY]) for shard in self.shards
        )

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @staticmethod
    def _load(path: Path) -> Dict[str, torch.Tensor]:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot load {path} as plain tensors ({first_line}): it is corrupt or not a Meta checkpoint shard"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a dict of tensors: it is not a Meta checkpoint shard")
        return state

    def _check_keys(self) -> None:
        expected = set(self.stored_keys)
        for path, shard in zip(self.paths, self.shards):
            keys = set(shard) - IGNORED_KEYS
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            if missing or unexpected:
                parts = [f"missing {', '.join(missing[:5])}" if missing else "", f"unexpected {', '.join(unexpected[:5])}" if unexpected else ""]
                raise CheckpointError(
                    f"{path.name} does not match params.json ({'; '.join(p for p in parts if p)}): "
                    f"check that params.json belongs to these weights"
                )

    def _check_shapes(self, key: str) -> None:
        full_shape, dim = self.layout[key]
        shapes = {tuple(shard[key].shape) for shard in self.shards}
        if len(shapes) > 1:
            raise CheckpointError(
                f"shards disagree on the shape of {key} ({sorted(shapes)}): they come from different checkpoints"
            )
        shape = list(shapes.pop())
        if dim is not None:
            shape[dim] *= self.num_shards
        if tuple(shape) != full_shape:
            raise CheckpointError(
                f"{key} is {tuple(shape)} across {self.num_shards} shard(s) but params.json implies {full_shape}: "
                f"use the params.json that came with these weights"
            )

    def read(self, key: str, rank: int, world_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The part of parameter `key` that `rank` of `world_size` holds, as `dtype` on `device`.

        Integer tensors (quantized weights) keep their dtype. Only that part is read. A whole shard tensor
        already in the right dtype on the CPU is used in place;
        anything else is copied in blocks whose shard pages are released right after, so resident memory
        grows by about the part's size.
        """
        if key == OUTPUT_KEY and self.output_absent:
            key = EMBEDDING_KEY  # the same shape and split
        full_shape, dim = self.layout[key]
        if dim is None:
            parts, dim, shape = [self.shards[0][key]], 0, list(full_shape)
        else:
            begin, end = rank_range(key, full_shape[dim], self.args, rank, world_size)
            piece_len = full_shape[dim] // self.num_shards
            parts = []
            for i in range(begin // piece_len, -(-end // piece_len)):
                lo, hi = max(begin - i * piece_len, 0), min(end - i * piece_len, piece_len)
                parts.append(self.shards[i][key].narrow(dim, lo, hi - lo))
            shape = list(full_shape)
            shape[dim] = end - begin
        if not parts[0].is_floating_point():
            dtype = parts[0].dtype
        if len(parts) == 1 and parts[0].dtype == dtype and device.type == "cpu" and parts[0].is_contiguous():
            return parts[0]
        result = torch.empty(shape, dtype=dtype, device=device)
        offset = 0
        for part in parts:
            _copy_releasing(result.narrow(dim, offset, part.shape[dim]), part)
            offset += part.shape[dim]
        return result

    def rank_state_dict(
        self, rank: int, world_size: int, dtype: torch.dtype, device: torch.device, keys: Optional[List[str]] = None
    ) -> Dict[str, torch.Tensor]:
        """Every parameter's part (or those of `keys`) for `rank` of `world_size`; a tied output projection is the
        embedding's tensor."""
        state = {}
        for key in self.layout if keys is None else keys:
            if key == OUTPUT_KEY and self.tied_output and EMBEDDING_KEY in state:
                state[key] = state[EMBEDDING_KEY]  # both split by vocabulary rows: the same part on every rank
            else:
                state[key] = self.read(key, rank, world_size, dtype, device)
        return state

    def load_into(
        self,
        module: nn.Module,
        rank: int,
        world_size: int,
        dtype: torch.dtype,
        device: torch.device,
        prefix: str = "",
        *,
        linear: Optional[bool] = None,
    ) -> None:
        """Give `module` (a model built without its weights, or its submodule named `prefix`) each tensor's part
        for `rank` of `world_size`, as `dtype` on `device` (see `read`).

        `linear=False` loads all but the linear layers' weights (a tied output projection's, the embedding's
        tensor, comes with the others), `linear=True` only those: a model can then load one block's at a time
        (see llama.quantized_linear.quantize_model)."""
        late = set(linear_weight_keys(self.layout)) - ({OUTPUT_KEY} if self.tied_output else set())
        keys = [prefix + name for name in module.state_dict(keep_vars=True)]
        keys = [key for key in keys if linear is None or (key in late) == linear]
        state = self.rank_state_dict(rank, world_size, dtype, device, keys)
        module.load_state_dict({key[len(prefix) :]: tensor for key, tensor in state.items()}, assign=True, strict=False)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checklist(directory: Path) -> None:
    """checklist.chk with a `md5  name` line (md5sum's format, as download.sh verifies) for every other file."""
    lines = [f"{md5sum(p)}  {p.name}\n" for p in sorted(Path(directory).iterdir()) if p.name != "checklist.chk"]
    (Path(directory) / "checklist.chk").write_text("".join(lines))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary path)` for a file beside `path`, then rename it to `path`: readers see the old file
    or the complete new one, never a partial one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _remove_abandoned_stagings(out_dir: Path) -> None:
    """Remove staging directories for `out_dir` left by killed processes of this machine (a process that cannot
    clean up, e.g. after SIGKILL); those of running processes stay."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.partial-(\d+)-")
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _process_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` to write into; on success add checklist.chk and rename it
    to `out_dir`, on any failure or interruption remove it. `out_dir` must not exist or be empty."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_stagings(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield staging
        write_checklist(staging)
        os.chmod(staging, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
