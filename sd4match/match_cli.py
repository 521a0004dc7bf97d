"""The ``sd4match`` command: ``sd4match match SOURCE TARGET --points ... --prompt ... [--out match.png]``.

Writes the predicted target points (original target frame) with a confidence each as JSON (default, on
stdout) and/or CSV, and optionally the picture of the matches. Bad input exits with status 2 and a message
naming the argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sd4match.io import write_table_atomic, write_text_atomic
from sd4match.match_models import DEMO_WORLD, MatchInputError
from sd4match.match_points import CONFIDENCE_DEFINITION, Matcher, MatchResult
from sd4match.matching import MATCHING_METHODS

STDOUT = "-"
EXIT_BAD_INPUT = 2


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _match_parser(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``sd4match match``."""
    parser.add_argument("source", help="source image (any format PIL reads)")
    parser.add_argument("target", help="target image")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", help='source points "x1,y1;x2,y2" (pixels) or a .json/.csv file of x, y')
    where.add_argument("--grid", type=_positive, metavar="N", help="an N x N grid of cell centres")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="a tuned or imported prompt file (prompt.safetensors + its .json)")
    prompt.add_argument("--text", help='a text prompt, DIFT-style (e.g. "a photo of a {category}")')
    parser.add_argument("--category", default="object", help="the images' category (Class, {category})")
    parser.add_argument("--gt", help="ground-truth target points (same syntax as --points), drawn and scored")
    parser.add_argument(
        "--config", action="append", help="config file(s), later ones override (default: config.yaml)"
    )
    parser.add_argument("--demo", action="store_true", help=f"the demo world: the config plus {DEMO_WORLD}")
    parser.add_argument("--sd-model", help="a Stable Diffusion model of the config's registry or a folder")
    parser.add_argument("--dinov2-model", help="DINOv2 for CPM prompts: a registry name or a folder")
    parser.add_argument("--method", choices=MATCHING_METHODS, help="matching (default: matching.reported)")
    parser.add_argument("--timestep", type=int, help="diffusion timestep (default: from the config)")
    parser.add_argument("--ensemble", type=_positive, help="noise draws averaged (default: from the config)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the prompt's run or seed)")
    parser.add_argument("--image-size", type=_positive, help="S of the S x S frame (default: image_size)")
    parser.add_argument("--root", help="folder the images' noise keys are relative to")
    parser.add_argument("--pair-id", help="the pair's id in the CPM noise seed (default: <source>|<target>)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON (- for stdout; the default)")
    parser.add_argument("--csv", metavar="PATH", help="write one row per point as CSV (- for stdout)")
    parser.add_argument("--out", metavar="PICTURE", help="draw the matches (.png, .pdf, .svg, .jpg)")


def build_parser() -> argparse.ArgumentParser:
    """``sd4match`` with its subcommands."""
    parser = argparse.ArgumentParser(prog="sd4match", description="SD4Match: semantic matching with SD.")
    commands = parser.add_subparsers(dest="command", required=True)
    match = commands.add_parser(
        "match",
        help="match points of a source image into a target image",
        description="Match points of a source image into a target image with a tuned prompt or a text "
        "prompt; prints JSON (target points in the original target frame, a confidence each). "
        f"Confidence: {CONFIDENCE_DEFINITION}",
    )
    _match_parser(match)
    return parser


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def request_from_args(args: argparse.Namespace) -> dict:
    """The ``match_models.MatchRequest`` fields the arguments give."""
    return {
        "prompt": args.prompt,
        "text": args.text,
        "category": args.category,
        "config": tuple(args.config or ["config.yaml"]),
        "demo": args.demo,
        "sd_model": args.sd_model,
        "dinov2_model": args.dinov2_model,
        "method": args.method,
        "timestep": args.timestep,
        "ensemble": args.ensemble,
        "seed": args.seed,
        "image_size": args.image_size,
        "root": args.root,
        "pair_id": args.pair_id,
        "device": args.device or _default_device(),
    }


def write_outputs(result: MatchResult, args: argparse.Namespace) -> None:
    """JSON and/or CSV (files written atomically, ``-`` to stdout) and the picture."""
    json_path = args.json if args.json or args.csv else STDOUT
    if json_path:
        text = json.dumps(result.to_json(), indent=2) + "\n"
        if json_path == STDOUT:
            sys.stdout.write(text)
        else:
            write_text_atomic(json_path, text)
    if args.csv == STDOUT:
        result.to_frame().to_csv(sys.stdout, index=False)
    elif args.csv:
        write_table_atomic(result.to_frame(), args.csv)
    if args.out:
        from sd4match.match_figure import draw_matches

        draw_matches(result, args.out)


def run_match(args: argparse.Namespace) -> MatchResult:
    """Load what the arguments ask for, match, write the outputs."""
    matcher = Matcher.from_request(**request_from_args(args))
    result = matcher.match(args.source, args.target, args.points, args.grid, args.gt)
    write_outputs(result, args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sd4match`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sd4match.match_figure import FORMATS

    if args.csv and args.csv != STDOUT and Path(args.csv).suffix != ".csv":
        parser.error(f"argument --csv: {args.csv} must end with .csv (or be - for stdout)")
    if args.out and Path(args.out).suffix.lower() not in FORMATS:
        parser.error(f"argument --out: {args.out} must end with one of {sorted(FORMATS)}")
    try:
        run_match(args)
    except MatchInputError as exc:
        print(f"sd4match match: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
