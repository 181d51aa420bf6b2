"""Self-generated distillation text: the float teacher samples sequences, which train (and calibrate) the
student alongside the user's text, mixed by weight (LLM-QAT, Liu et al. 2023: data-free distillation on
text in the teacher's own distribution).

    generate_blocks   N sequences of `seq_len` tokens from a causal LM, batched, with its KV cache
                      (`qat.data.sampling`), sampled at a stated temperature / top-p (no top-k), the
                      first token drawn uniformly from the vocabulary (special tokens left out), the
                      end-of-sequence token suppressed so that every sequence is whole, by a copy of the
                      teacher in `sampler_dtype`'s choice (bfloat16 where the chip has bf16 matmuls,
                      else float32); cached on disk
    GeneratedTextDataModule   TextDataModule whose training (hence calibration) blocks are the user's
                      text and the generated sequences, mixed by `generated_weight`; validation, and
                      the evaluation domains, stay the user's text

The cache: `$QAT_CACHE/generated/<key>/` (default `~/.cache/qat`), the key a hash of the teacher's weights
(a SHA-256 of every tensor's name, dtype, shape and bytes) and the settings (seed, sequence length,
temperature, top-p, batch size, dtype, vocabulary, first-token rule). Generation batch b is sampled from its own
seed (seed, b), so it is the same whatever came before it: each finished batch is written to
`batch_NNNNN.pt` and recorded with its SHA-256 in `manifest.json` (both written atomically), a killed
generation continues from the batches it stored, and asking for more sequences later extends the same
cache. A batch whose file does not match its recorded hash is generated again.

Example:
    >>> blocks = generate_blocks(model, 256, GenerationSettings(seq_len=256, temperature=1.0, top_p=0.95))
    >>> dm = GeneratedTextDataModule(tokenizer, teacher=model, generated_sequences=256, generated_weight=0.5)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from qat.data.loading import ResumableLoader
from qat.data.sampling import sample_sequences
from qat.data.text import PackedBlocks, TextDataModule
from qat.hf.load import cache_dir

__all__ = ["GeneratedTextDataModule", "GenerationCache", "GenerationSettings", "MixedBlocks",
           "generate_blocks", "mix_indices", "sampler_dtype", "weights_digest"]

CALIBRATION_SOURCES = ("mix", "user", "generated")
CACHE_VERSION = 3  # 3: inverse-CDF nucleus draws; 2: multinomial draws (qat.data.sampling); 1: generate


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher samples: what the cache key holds besides the teacher's weights."""

    seq_len: int
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0
    first_token: str = "uniform"  # drawn uniformly from the vocabulary, special tokens left out
    dtype: str = "float32"  # the teacher's copy that samples: 'float32' or 'bfloat16' (`sampler_dtype` chooses)

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"generated sequence length {self.seq_len!r} must be an integer >= 2")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"generation batch_size={self.batch_size!r} must be a positive integer")
        if self.first_token != "uniform":
            raise ValueError(f"first_token={self.first_token!r}: only 'uniform' is implemented")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"generation dtype={self.dtype!r}: use 'bfloat16' or 'float32'")


def sampler_dtype(requested: str, device: torch.device | str = "cpu") -> str:
    """The dtype the sampling copy of the teacher runs in: `requested` unless it is 'auto', which picks
    'bfloat16' on a GPU or a CPU with bf16 matrix instructions (AVX512-BF16 or AMX) and 'float32' elsewhere.

    Why not bfloat16 everywhere: without those instructions a CPU emulates bf16 matmuls, and SmolLM2's
    sampling step ran 4.9x slower in bf16 than in float32 on an AVX2 EPYC (1118 vs 229 ms at batch 64;
    benchmarks/models/generation_speed.md), while on an AVX512-BF16 one bf16 was about twice as fast."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        return "bfloat16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _default_cache_root() -> Path:
    return cache_dir() / "generated"


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class GenerationCache:
    """The folder of one (teacher weights, settings) pair: batch files and the manifest recording their hashes."""

    def __init__(self, digest: str, settings: GenerationSettings, vocab_size: int, excluded: Sequence[int],
                 root: Optional[Path] = None) -> None:
        self.identity = {"version": CACHE_VERSION, "weights_sha256": digest, "vocab_size": int(vocab_size),
                         "excluded_first_tokens": sorted(int(i) for i in excluded), **asdict(settings)}
        self.key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root or _default_cache_root()) / self.key
        self.manifest_path = self.folder / "manifest.json"

    def _manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {"identity": self.identity, "batches": {}}
        return manifest if manifest.get("identity") == self.identity else {"identity": self.identity, "batches": {}}

    def _file(self, index: int) -> Path:
        return self.folder / f"batch_{index:05d}.pt"

    def load(self, index: int) -> Optional[Tensor]:
        """Batch `index` when it is stored and its file matches the recorded SHA-256, else None."""
        recorded = self._manifest()["batches"].get(str(index))
        path = self._file(index)
        if recorded is None or not path.is_file() or _sha256(path) != recorded:
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def store(self, index: int, tokens: Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(index)
        _atomic_write(path, lambda handle: torch.save(tokens.cpu().clone(), handle))
        manifest = self._manifest()
        manifest["batches"][str(index)] = _sha256(path)
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _atomic_write(self.manifest_path, lambda handle: handle.write(text))

    def stored(self) -> list[int]:
        return sorted(int(i) for i in self._manifest()["batches"])


def _batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _first_tokens(count: int, vocab_size: int, excluded: Sequence[int], generator: torch.Generator) -> Tensor:
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in excluded if 0 <= i < vocab_size]] = False
    choices = allowed.nonzero().reshape(-1)
    return choices[torch.randint(len(choices), (count, 1), generator=generator)]


@torch.no_grad()
def generate_batch(model: nn.Module, index: int, settings: GenerationSettings, vocab_size: int,
                   excluded: Sequence[int]) -> Tensor:
    """Generation batch `index`: (batch_size, seq_len) int64 tokens, sampled from seed (settings.seed, index) in a
    forked RNG (the caller's random state is untouched)."""
    device = next(model.parameters()).device
    seed = _batch_seed(settings.seed, index)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        first = _first_tokens(settings.batch_size, vocab_size, excluded, torch.Generator().manual_seed(seed))
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        out = sample_sequences(model, first.to(device), settings.seq_len - 1, settings.temperature, settings.top_p,
                               suppressed=[int(i) for i in eos])
    if out.shape != (settings.batch_size, settings.seq_len):
        raise RuntimeError(f"generation batch {index} came back with shape {tuple(out.shape)}, not "
                           f"({settings.batch_size}, {settings.seq_len})")
    return out.cpu().long()


def _sampler(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of `model` in `dtype` that samples: the sampler fuses its projections in place
    (`qat.hf.batched_decoder`), and the teacher's own parameters are never replaced or cast."""
    import copy

    return copy.deepcopy(model).to(getattr(torch, dtype))


def _device(model: Optional[nn.Module]) -> torch.device:
    parameter = next(model.parameters(), None) if model is not None else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _special_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return sorted({int(i) for i in ids})


def generate_blocks(model: nn.Module, num_sequences: int, settings: GenerationSettings,
                    vocab_size: Optional[int] = None, excluded_first_tokens: Sequence[int] = (),
                    cache_root: Optional[str | os.PathLike] = None, progress: bool = True,
                    digest: Optional[str] = None) -> Tensor:
    """`num_sequences` sampled sequences, (num_sequences, seq_len) int64, from the cache where stored (see the
    module docstring), generated and stored batch by batch otherwise, with a progress bar."""
    if not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"generated_sequences={num_sequences!r} must be a positive integer")
    config = getattr(model, "config", None)
    vocab_size = int(vocab_size or getattr(config, "vocab_size", 0) or 0)
    if vocab_size < 1:
        raise ValueError("generate_blocks: the model's vocabulary size is unknown; pass vocab_size")
    if not hasattr(model, "generate"):
        raise ValueError(f"the teacher {type(model).__name__} has no generate(): self-generated text needs a "
                         "causal language model (task causal_lm, a Hugging Face model)")
    cache = GenerationCache(digest or weights_digest(model), settings, vocab_size, excluded_first_tokens,
                            Path(cache_root) if cache_root is not None else None)
    count = math.ceil(num_sequences / settings.batch_size)
    batches: list[Optional[Tensor]] = [cache.load(i) for i in range(count)]
    missing = [i for i, b in enumerate(batches) if b is None]
    if missing:
        sampler = _sampler(model, settings.dtype).eval()
        with _Progress(progress, len(missing), count - len(missing), settings) as advance:
            for index in missing:
                batches[index] = generate_batch(sampler, index, settings, vocab_size, excluded_first_tokens)
                cache.store(index, batches[index])
                advance()
        del sampler
    return torch.cat(batches)[:num_sequences]  # type: ignore[arg-type]


class _Progress:
    """A rich progress bar over the batches still to generate (tokens/s in its text); silent when off."""

    def __init__(self, enabled: bool, todo: int, done: int, settings: GenerationSettings) -> None:
        self.enabled, self.todo, self.done, self.settings = enabled, todo, done, settings

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        label = (f"generating distillation text ({self.settings.batch_size} x {self.settings.seq_len} tokens a batch"
                 + (f", {self.done} batches cached" if self.done else "") + ")")
        self.task = self.bar.add_task(label, total=self.todo, speed="")
        self.start, self.count = time.perf_counter(), 0

        def advance() -> None:
            self.count += 1
            rate = self.count * self.settings.batch_size * self.settings.seq_len / (time.perf_counter() - self.start)
            self.bar.update(self.task, advance=1, speed=f"{rate:,.0f} tokens/s")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def mix_indices(num_user: int, num_generated: int, weight: Optional[float]) -> list[tuple[int, int]]:
    """One epoch of (source, index) pairs, source 0 the user's blocks and 1 the generated ones.

    `weight` None: every block of both once. Else the share of generated blocks is `weight`: the epoch is the
    shortest in which every block of each source used comes at least once, S = max(num_user / (1 - weight),
    num_generated / weight) rounded up, round(weight * S) of them generated and the rest user blocks, each
    source cycled in order (weight 0: user blocks only; 1: generated only).
    """
    if weight is None:
        return [(0, i) for i in range(num_user)] + [(1, i) for i in range(num_generated)]
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"generated_weight={weight!r} must be between 0 and 1")
    if weight == 0.0:
        return [(0, i) for i in range(num_user)]
    if weight == 1.0:
        return [(1, i) for i in range(num_generated)]
    size = math.ceil(max(num_user / (1.0 - weight), num_generated / weight) - 1e-9)
    generated = round(weight * size)
    return [(0, i % num_user) for i in range(size - generated)] + [(1, i % num_generated) for i in range(generated)]


class MixedBlocks(Dataset):
    """The training samples of a mix: user blocks and generated blocks in the order of `mix_indices`."""

    def __init__(self, user: PackedBlocks, generated: PackedBlocks, weight: Optional[float]) -> None:
        self.sources = (user, generated)
        self.index = mix_indices(len(user), len(generated), weight)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        source, index = self.index[item]
        return self.sources[source][index]

    def generated_share(self) -> float:
        return sum(source for source, _ in self.index) / max(1, len(self.index))


class GeneratedTextDataModule(TextDataModule):
    """TextDataModule that also trains (and calibrates) on text its float teacher generates.

    Args (besides TextDataModule's):
        teacher: the float causal LM that samples (a recipe run passes the recipe's model as loaded, before
            `prepare`); needed only when the cache lacks batches, and let go after `setup`.
        generated_sequences: how many sequences of `seq_len` tokens to generate (each is one training block).
        generated_weight: the share of generated blocks among the training blocks (see `mix_indices`);
            None: every user and generated block once per epoch; 1.0: generated text only (data-free).
        temperature, top_p: the sampling settings (no top-k; the first token uniform over the vocabulary
            but its special tokens; end-of-sequence suppressed).
        generation_batch_size: sequences sampled together.
        generation_dtype: the dtype of the teacher's copy that samples: 'auto' (`sampler_dtype`: bfloat16
            where the chip has bf16 matmuls, else float32), 'bfloat16' or 'float32'. The resolved dtype is
            part of the cache key.
        generation_seed: the seed of the samples (default: `seed`).
        calibration_source: what the first training batches that calibrate (and GPTQ-round) the model are
            drawn from: 'mix' (the training mix), 'user' (the user's text only) or 'generated'.
        cache_dir: where the cache folders go (default `$QAT_CACHE/generated`, `~/.cache/qat/generated`).
        progress: show the generation progress bar.

    Validation (and `eval_corpora`) stays on the user's text; calibration takes the first batches of
    `calibration_dataloader()`: the training mix, or one of its two sources (`calibration_source`).
    """

    def __init__(self, tokenizer: Any, teacher: Optional[nn.Module] = None, generated_sequences: int = 256,
                 generated_weight: Optional[float] = 0.5, temperature: float = 1.0, top_p: float = 0.95,
                 generation_batch_size: int = 16, generation_seed: Optional[int] = None,
                 generation_dtype: str = "auto", calibration_source: str = "mix",
                 cache_dir: Optional[str] = None, progress: bool = True, **text_args: Any) -> None:
        super().__init__(tokenizer, **text_args)
        if generated_weight is not None and not 0.0 <= generated_weight <= 1.0:
            raise ValueError(f"generated_weight={generated_weight!r} must be between 0 and 1")
        if calibration_source not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration_source={calibration_source!r}: use one of {', '.join(CALIBRATION_SOURCES)}")
        if not isinstance(generated_sequences, int) or generated_sequences < 1:
            raise ValueError(f"generated_sequences={generated_sequences!r} must be a positive integer")
        self.settings = GenerationSettings(seq_len=self.seq_len, temperature=float(temperature), top_p=float(top_p),
                                           batch_size=generation_batch_size,
                                           dtype=sampler_dtype(generation_dtype, _device(teacher)),
                                           seed=self.seed if generation_seed is None else generation_seed)
        self.teacher, self.generated_sequences, self.generated_weight = teacher, generated_sequences, generated_weight
        self.cache_dir, self.progress, self.calibration_source = cache_dir, progress, calibration_source
        self.generated_set: Optional[PackedBlocks] = None
        self.user_train_set: Optional[PackedBlocks] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """The user's text as TextDataModule splits it, the generated blocks, and the training mix (once)."""
        if self.generated_set is not None:
            return
        super().setup(stage)
        if self.generated_weight == 0.0:
            self.generated_set = PackedBlocks(torch.empty(0, self.seq_len, dtype=torch.long))
        else:
            if self.teacher is None:
                raise ValueError("GeneratedTextDataModule needs the teacher model (teacher=...); a recipe run passes "
                                 "the recipe's float model")
            blocks = generate_blocks(self.teacher, self.generated_sequences, self.settings, self.vocab_size,
                                     _special_ids(self.tokenizer), self.cache_dir, self.progress)
            self.generated_set = PackedBlocks(blocks)
        self.teacher = None  # the float copy is not kept for the whole run
        self.user_train_set = self.train_set
        self.train_set = MixedBlocks(self.user_train_set, self.generated_set, self.generated_weight)

    def calibration_dataloader(self) -> ResumableLoader:
        """Training-order batches of `calibration_source`: the mix (the training loader itself), or one source."""
        self._require_setup()
        source = {"mix": self.train_set, "user": self.user_train_set, "generated": self.generated_set}
        blocks = source[self.calibration_source]
        if len(blocks) == 0:
            raise ValueError(f"calibration_source={self.calibration_source!r} holds no blocks (generated_weight=0?)")
        return ResumableLoader(blocks, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def summary(self) -> str:
        text = super().summary()
        share = self.train_set.generated_share() if isinstance(self.train_set, MixedBlocks) else 0.0
        return (f"{text}; {len(self.generated_set)} generated blocks, {share:.0%} of the {len(self.train_set)} "
                "training blocks an epoch")
