"""Convert FBCNN weights between the original's `.pth` and this project's `.safetensors`.

This module owns the command

    python -m runners.convert_weights IN OUT [--overwrite] [--fp16 | --int8] [--widen NC NC NC NC]

- `.pth`/`.pt` -> `.safetensors` (read with `weights_only=True`, wrappers and `module.`
  prefixes taken off), with the FBCNN constructor arguments in the metadata (`fbcnn_kwargs`);
- `.safetensors` -> `.pth`: a plain state dict in the network's key order, which the original's
  `load_state_dict(..., strict=True)` accepts;
- `--fp16`: a half-size `.safetensors` (the shipped lite models); `--int8`: a quarter-size one,
  weights in 8 bits with a scale per output channel (`utils.weight_codec`; loading decodes it);
  `--widen`: the network grown to wider levels with the same function (`models.widen`),
  `--noise` breaking its symmetry.
The weights are checked first by building the FBCNN they describe and loading them strictly;
the output is written atomically, replacing a file only with `--overwrite`. The keys cannot
tell ReLU from LeakyReLU, nor average from max pooling: a `.pth` reads as `R`/`BR`, `avgpool`.
"""
import argparse
import os

import torch

from models.model_zoo import (build_from_state_dict, infer_fbcnn_kwargs, load_state_dict_file,
                              read_fbcnn_kwargs)
from models.widen import widen_fbcnn
from runners.cli import run_cli
from utils.checkpoint import save_network
from utils.errors import UserError
from utils.fileio import atomic_write, display_path
from utils.weight_codec import encode_int8

__all__ = ["convert", "main"]

_TORCH_EXTENSIONS = (".pth", ".pt")
_SAFETENSORS = ".safetensors"


def _format(path, what):
    ext = os.path.splitext(path)[1].lower()
    if ext in _TORCH_EXTENSIONS:
        return "pth"
    if ext == _SAFETENSORS:
        return "safetensors"
    raise UserError(f"{what} {display_path(path)}: unknown extension {ext or '(none)'!r}; "
                    f"expected .pth, .pt or .safetensors")


def convert(src, dst, overwrite=False, fp16=False, widen=None, noise=0.0, int8=False):
    """Convert the FBCNN weights in `src` to the other format at `dst` (with `fp16` or `int8`,
    to fp16 or int8-encoded safetensors from either format; with `widen`, four level widths,
    grown to them by `models.widen.widen_fbcnn` with `noise`); returns the FBCNN constructor
    arguments written.
    UserError when there is nothing to convert, `src` is not an FBCNN state dict, or `dst`
    exists and `overwrite` is false."""
    src_format, dst_format = _format(src, "IN"), _format(dst, "OUT")
    if fp16 and int8:
        raise UserError("--fp16 and --int8: choose one storage")
    for flag, on in (("--fp16", fp16), ("--int8", int8)):
        if on and dst_format != "safetensors":
            raise UserError(f"{flag}: OUT {display_path(dst)} must be a .safetensors file")
    if src_format == dst_format and not fp16 and not int8 and not widen:
        raise UserError(f"IN and OUT are both {src_format} files: nothing to convert "
                        f"(.pth/.pt <-> .safetensors)")
    if not overwrite and os.path.lexists(dst):
        raise UserError(f"OUT {display_path(dst)} exists; pass --overwrite to replace it")
    state = load_state_dict_file(src)
    stored = read_fbcnn_kwargs(src)
    net = build_from_state_dict(state, source=src, kwargs=stored)  # refuses non-FBCNN files
    if net.global_skip and dst_format != "safetensors":
        raise UserError(f"IN {display_path(src)} has a global skip, which a .pth cannot say "
                        f"(the original's code would run it without); keep it .safetensors")
    kwargs = stored or infer_fbcnn_kwargs(state, src)
    if widen:
        try:
            net = widen_fbcnn(net.float(), widen, noise=noise)
        except ValueError as exc:
            raise UserError(f"--widen: {exc}") from None
        kwargs = {**kwargs, "nc": list(net.nc)}
        state = net.state_dict()
    # in the network's order (safetensors sorts the keys): KAIR's non-strict load pairs by it
    state = {k: state[k].detach().cpu().contiguous() for k in net.state_dict()}
    try:
        if dst_format == "safetensors":
            save_network(dst, encode_int8(state) if int8 else state, kwargs,
                         metadata={"converted_from": os.path.basename(src)},
                         dtype=torch.float16 if fp16 else None, replace=overwrite)
        else:
            atomic_write(dst, lambda f: torch.save(state, f), replace=overwrite)
    except FileExistsError:  # it appeared while converting
        raise UserError(f"OUT {display_path(dst)} exists; pass --overwrite to replace it") from None
    return kwargs


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m runners.convert_weights",
        description="Convert FBCNN weights: .pth (the original's, a plain state dict) to "
                    ".safetensors with the architecture in its metadata, or back.")
    p.add_argument("input", metavar="IN", help="a .pth/.pt or .safetensors weight file")
    p.add_argument("output", metavar="OUT", help="the file to write, in the other format")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--fp16", action="store_true",
                   help="store a .safetensors OUT in fp16 (IN may be .safetensors too)")
    p.add_argument("--int8", action="store_true",
                   help="store a .safetensors OUT with 8-bit weights, a scale per output "
                        "channel (a quarter of fp32's size; loading decodes it)")
    p.add_argument("--widen", type=int, nargs=4, metavar="NC",
                   help="grow the network to these four level widths, same function")
    p.add_argument("--noise", type=float, default=0.0,
                   help="with --widen: noise on the widened weights, a fraction of their "
                        "standard deviation (default 0: exactly the same function)")
    args = p.parse_args(argv)

    def body():
        kwargs = convert(args.input, args.output, overwrite=args.overwrite, fp16=args.fp16,
                         widen=args.widen, noise=args.noise, int8=args.int8)
        print(f"wrote {args.output} (FBCNN in_nc {kwargs['in_nc']}, nc {kwargs['nc']}, "
              f"nb {kwargs['nb']}, act_mode {kwargs['act_mode']})")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
