"""Convert FBCNN weights between the original's `.pth` and this project's `.safetensors`.

This module owns the command

    python -m runners.convert_weights IN OUT [--overwrite] [--fp16]

- `.pth`/`.pt` -> `.safetensors`: the state dict (loaded with `torch.load(weights_only=True)`:
  no pickled code runs; a DataParallel `module.` prefix or a `params`/`state_dict` wrapper is
  taken off) goes to safetensors with the metadata `fbcnn_kwargs`, the FBCNN constructor
  arguments inferred from its keys and shapes (`models.model_zoo.infer_fbcnn_kwargs`), so the
  file loads here without guessing (test scripts, `path.pretrained_netG`, the restore tool).
- `.safetensors` -> `.pth`: a plain state dict, the tensors as stored and the keys in the
  network's order (as `state_dict()` lists them; safetensors sorts them, and KAIR's non-strict
  loading pairs keys by position), which the original's
  `model.load_state_dict(torch.load(path), strict=True)` accepts, as do tools that read only
  `.pth`; the metadata cannot come along (a `.pth` of the original has none).

`--fp16` stores the floating-point tensors of a `.safetensors` OUT in fp16 (half the size: the
shipped lite models); IN may then be a `.safetensors` file too. `--widen NC1 NC2 NC3 NC4` grows
the network to those level widths with the same function (`models.widen`, to go on training a
wider model from a trained one), `--noise` breaking the copied channels' symmetry.

Both ways the weights are checked first by building the FBCNN they describe and loading them
strictly, so a file that is not an FBCNN state dict stops with one error line and writes nothing.
The output is written atomically (a temporary file, then moved into place) and an existing file
is replaced only with `--overwrite`. The keys cannot tell ReLU from LeakyReLU, nor average from
max pooling: a `.pth` becomes `R`/`BR` and `avgpool` in the metadata (the original's networks
are ReLU with strided convolutions, which the keys do tell).
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


def convert(src, dst, overwrite=False, fp16=False, widen=None, noise=0.0):
    """Convert the FBCNN weights in `src` to the other format at `dst` (with `fp16`, to fp16
    safetensors from either format; with `widen`, four level widths, grown to them by
    `models.widen.widen_fbcnn` with `noise`); returns the FBCNN constructor arguments written.
    UserError when there is nothing to convert, `src` is not an FBCNN state dict, or `dst`
    exists and `overwrite` is false."""
    src_format, dst_format = _format(src, "IN"), _format(dst, "OUT")
    if fp16 and dst_format != "safetensors":
        raise UserError(f"--fp16: OUT {display_path(dst)} must be a .safetensors file")
    if src_format == dst_format and not fp16 and not widen:
        raise UserError(f"IN and OUT are both {src_format} files: nothing to convert "
                        f"(.pth/.pt <-> .safetensors)")
    if not overwrite and os.path.lexists(dst):
        raise UserError(f"OUT {display_path(dst)} exists; pass --overwrite to replace it")
    state = load_state_dict_file(src)
    stored = read_fbcnn_kwargs(src)
    net = build_from_state_dict(state, source=src, kwargs=stored)  # refuses non-FBCNN files
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
            save_network(dst, state, kwargs, metadata={"converted_from": os.path.basename(src)},
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
    p.add_argument("--widen", type=int, nargs=4, metavar="NC",
                   help="grow the network to these four level widths, same function")
    p.add_argument("--noise", type=float, default=0.0,
                   help="with --widen: noise on the widened weights, a fraction of their "
                        "standard deviation (default 0: exactly the same function)")
    args = p.parse_args(argv)

    def body():
        kwargs = convert(args.input, args.output, overwrite=args.overwrite, fp16=args.fp16,
                         widen=args.widen, noise=args.noise)
        print(f"wrote {args.output} (FBCNN in_nc {kwargs['in_nc']}, nc {kwargs['nc']}, "
              f"nb {kwargs['nb']}, act_mode {kwargs['act_mode']})")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
