"""`medsyn align-map`: where each word of a text finds its patches in a CT volume, as NIfTI maps and previews."""

from __future__ import annotations

import argparse
import time

HELP = "Map each word of a text onto a CT volume with a trained align run (NIfTI maps, previews, align_map.json)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--align", required=True, help="run directory of `python train.py align`")
    parser.add_argument("--volume", required=True,
                        help="a sample folder (OUT/<index>/ of sample.py), a phantom subject folder, or a NIfTI "
                             "CT file in HU")  # fmt: skip
    parser.add_argument("--text", required=True, help="the report or phrase whose words are mapped")
    parser.add_argument(
        "--out", required=True, help="output folder for the maps, previews and align_map.json"
    )
    parser.add_argument("--mask", action="append", default=[], metavar="CHANNEL=PATH",
                        help="a mask of a NIfTI CT file (lobes, airway, vessels; repeatable); masks the volume "
                             "lacks are segmented by --backend")  # fmt: skip
    parser.add_argument("--backend", default="threshold",
                        help="segmentation backend for missing masks: threshold (default) or totalsegmentator")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the align model")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing an earlier map's files",
    )


def run(args: argparse.Namespace) -> int:
    from medsyn.alignment.map_files import check_map_out, write_align_map
    from medsyn.alignment.maps import align_grid, align_map
    from medsyn.alignment.run import load_align_run
    from medsyn.data.channels import MASK_CHANNELS
    from medsyn.data.segment import get_backend
    from medsyn.errors import DataError
    from medsyn.evaluation.volumes import load_volume, volume_ref
    from medsyn.generation.fixed import validate_channel

    if not args.text.strip():
        raise DataError("--text is empty; give the report or phrase to map")
    masks = {}
    for spec in args.mask:
        name, sep, path = (s.strip() for s in spec.partition("="))
        if not sep or not path or name in masks:
            raise DataError(f"--mask {spec!r}: expected CHANNEL=PATH, each channel once, CHANNEL one of "
                            f"{', '.join(MASK_CHANNELS)}")  # fmt: skip
        masks[name] = path
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    check_map_out(args.out, args.overwrite)  # before any work, not after
    ref = volume_ref(args.volume, masks)
    align = load_align_run(args.align, args.device)
    align_grid(align)  # a run whose grid cannot be told fails before the volume is read
    began = time.perf_counter()
    volume = load_volume(ref)
    validate_channel("ct", volume.hu, ref.source)  # Hounsfield units, not an encoded or normalized CT
    missing = [c for c in MASK_CHANNELS if c not in volume.masks]
    segmenter = get_backend(args.backend) if missing else None
    maps = align_map(align, volume.hu, volume.affine, volume.masks, args.text, segmenter, ref.source)
    write_align_map(maps, align, volume.hu, volume.affine, args.out, ref.source, args.overwrite)
    global_, fine = maps.scores["global"], maps.scores["fine"]
    print(f"medsyn align-map: {len(maps.words)} words; report-volume similarity {global_:.3f}, word-patch "
          f"score {fine:.3f}; done in {time.perf_counter() - began:.1f} s")  # fmt: skip
    return 0
