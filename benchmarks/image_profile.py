"""Where the image pipeline's time goes, stage by stage, for `benchmarks/images.py`.

`stage_profile` times each stage on one thread in this process; `model_bounds` turns its
per-image figures into the seconds the models alone need on the benchmark's cores (what no
in-Spark design can remove).
"""

from __future__ import annotations

import os
import time


def stage_profile(
    folder: str, sections: list[str], precisions: list[str], count: int = 32
) -> dict[str, float]:
    """Milliseconds per image of each stage, one thread, in this process: where time goes.

    The images are read, decoded and sent through the models stage by stage, the embedder
    in batches of 32 as in the tasks, each model after a warm-up call of the same size.
    """
    import cv2
    import numpy as np
    import torch

    from deepspark.inference import load_model
    from deepspark.vision.darknet import RUNTIMES as DARKNET_RUNTIMES
    from deepspark.vision.decoding import DecoderChooser, fit_image
    from deepspark.vision.embedder import default_embedder
    from deepspark.vision.zoo import DarknetDetector, yolov3_tiny_files

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    files = sorted(os.listdir(folder))[:count]
    detecting, int8 = "detect" in sections, "int8" in precisions  # profile only what runs
    embedder = load_model(default_embedder("auto"), num_threads=1)
    embedders = [("", embedder)]
    if int8:
        embedders.append(("_int8", load_model(default_embedder("onnx-int8"), num_threads=1)))
    for_detect, for_embed = DecoderChooser(min_side=416), DecoderChooser(min_side=224)
    spent: dict[str, float] = {}

    def timed(stage: str, work):
        start = time.perf_counter()
        result = work()
        spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
        return result

    def embed_all(pixels: list[np.ndarray], model=embedder) -> None:
        for start in range(0, len(pixels), 32):
            model((torch.from_numpy(np.stack(pixels[start : start + 32])),))

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as handle:
            return handle.read()

    encoded = timed("read", lambda: [read(name) for name in files])
    for chooser in (for_detect, for_embed):  # let each pick its decoder before the clock
        [chooser.decode(data) for data in encoded[:8]]
    decoded = timed("decode", lambda: [for_detect.decode(data) for data in encoded])
    small = timed("decode_small", lambda: [for_embed.decode(data) for data in encoded])
    fitted = timed("fit", lambda: [fit_image(image, 224, "center_crop").pixels for image in small])
    crop_pixels: list[np.ndarray] = []
    if detecting:
        detector = DarknetDetector(yolov3_tiny_files(), num_threads=1)
        detector(decoded[0])
        boxes = timed("detect", lambda: [detector(image) for image in decoded])
        crop_pixels = [
            fit_image(
                image[int(b.y0) : int(b.y1) + 1, int(b.x0) : int(b.x1) + 1], 224, "stretch"
            ).pixels
            for image, found in zip(decoded, boxes, strict=True)
            for b in found
        ]
        if int8:
            detector_int8 = DarknetDetector(yolov3_tiny_files(), num_threads=1, runtime="onnx-int8")
            detector_int8(decoded[0])
            timed("detect_int8", lambda: [detector_int8(image) for image in decoded])
    for suffix, model in embedders:
        embed_all(fitted, model)  # a full batch first: buffers are sized on the first one
        if detecting:
            timed(f"embed_crops{suffix}", lambda model=model: embed_all(crop_pixels, model))
        timed(f"embed_images{suffix}", lambda model=model: embed_all(fitted, model))
    profile = {f"{key}_ms_per_image": round(1000 * s / len(files), 2) for key, s in spent.items()}
    if not detecting:
        profile["decoder_chosen"] = for_embed.chosen.get("jpeg", "")
        return profile
    # The detector's runtimes side by side on 16 images as one batch: three rounds, each in
    # a rotated order, the best round of each kept.
    detectors = {
        runtime: DarknetDetector(yolov3_tiny_files(), num_threads=1, runtime=runtime)
        for runtime in DARKNET_RUNTIMES
    }
    best: dict[str, float] = {}
    for round_index in range(3):
        order = DARKNET_RUNTIMES[round_index:] + DARKNET_RUNTIMES[:round_index]
        for runtime in order:
            detectors[runtime].detect(decoded[:2])
            start = time.perf_counter()
            detectors[runtime].detect(decoded[:16])
            seconds = (time.perf_counter() - start) / len(decoded[:16])
            best[runtime] = min(best.get(runtime, seconds), seconds)
    for runtime, seconds in best.items():
        profile[f"detect_{runtime}_ms_per_image"] = round(1000 * seconds, 2)
    profile["crops_per_image"] = round(len(crop_pixels) / len(files), 2)
    profile["decoder_chosen"] = for_detect.chosen.get("jpeg", "")
    return profile


def model_bounds(profile: dict[str, float], count: int, cores: int) -> dict[str, float]:
    """Seconds the models alone need for ``count`` images on ``cores`` cores, per section
    (and per section at int8)."""
    per_image = {}
    for suffix in ("", "_int8"):
        if f"detect{suffix}_ms_per_image" in profile:
            per_image[f"detect{suffix}"] = (
                profile[f"detect{suffix}_ms_per_image"]
                + profile[f"embed_crops{suffix}_ms_per_image"]
            )
        if f"embed_images{suffix}_ms_per_image" in profile:
            per_image[f"embed{suffix}"] = profile[f"embed_images{suffix}_ms_per_image"]
    return {section: count * ms / 1000 / cores for section, ms in per_image.items()}
