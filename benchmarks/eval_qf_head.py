"""How well a model's QF head predicts the JPEG quality: predicted QF per true QF on a test set.

    python -m benchmarks.eval_qf_head --model fbcnn_gray [--testset LIVE1_gray]
                                      [--qf 10 30 50 70 90] [--qf-input 10 50 90]
                                      [--sampling 444]

Each image is compressed at each QF (data/jpeg.py, as the test scripts do; a colour image at
the chroma `--sampling`, default OpenCV's 4:2:0) and the network's
QF is read with `models.inference.predict_qf` (the encoder and the QF head, no decoder). The
table gives, per true QF, the mean and the range of the predictions and the mean and median
absolute error. FBCNN's flexible control rests on this head: a head that predicts the same QF
for every input (it has not learned, say after a short run) makes blind restoration ignore the
quality, and then a decoder trained on its output has never seen `qf_input` vary either.

`--qf-input` checks the decoder's side of that control: per true QF, the mean PSNR of the JPEG
input, of blind restoration and of restoration with each given QF as `qf_input`
(`models.inference.restore`, fp32). In a trained FBCNN the true QF gives about the blind PSNR
and QFs far above it leave artifacts; equal PSNRs for every `qf_input` mean the decoder ignores it.
"""
import argparse
import os
import sys

import numpy as np
import torch

from benchmarks.benchlib import print_table, write_json
from data.jpeg import SAMPLINGS, jpeg
from models.inference import predict_qf, resolve_device, restore
from models.model_zoo import load_model
from runners.cli import quality_factor, run_cli
from data.testsets import resolve_testset
from utils.errors import UserError
from utils.image import imread_uint, list_images
from utils.metrics import psnr

COLUMNS = [("qf", "true QF", "{}"), ("mean", "mean predicted", "{:.1f}"),
           ("min", "min", "{}"), ("max", "max", "{}"), ("mae", "mean abs error", "{:.1f}"),
           ("medae", "median abs error", "{:.1f}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a zoo name or weight file")
    p.add_argument("--testset", default=None,
                   help="name under --testsets-root or a folder (default: LIVE1_gray for a "
                        "1-channel model, LIVE1_color for a colour one)")
    p.add_argument("--testsets-root", default=None)
    p.add_argument("--qf", type=quality_factor, nargs="+", default=[10, 20, 30, 40, 50, 60, 70,
                                                                    80, 90])
    p.add_argument("--qf-input", type=quality_factor, nargs="+", default=[], metavar="QF",
                   help="also restore blind and with each of these QFs as qf_input, and report "
                        "the mean PSNR of each per true QF")
    p.add_argument("--sampling", choices=tuple(SAMPLINGS), default=None,
                   help="chroma sampling of the colour JPEGs (default: OpenCV's, 4:2:0)")
    p.add_argument("--units", action="store_true",
                   help="also report, per ReLU of the QF head's and the QF embedding's MLPs, the "
                        "share of units active on at least one input (a dead MLP predicts one "
                        "QF for everything)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    if model.net is None:
        raise UserError(f"--model {args.model}: has no QF head; give a network")
    channels = model.net.in_nc
    testset = args.testset or ("LIVE1_gray" if channels == 1 else "LIVE1_color")
    paths = list_images(resolve_testset(testset, args.testsets_root))[:args.limit]
    images = [imread_uint(path, channels) for path in paths]
    active = _watch_units(model.net) if args.units else None
    rows, per_image, psnr_rows = [], [], []
    for qf in args.qf:
        inputs = [jpeg(img, qf, args.sampling) for img in images]
        if args.qf_input:  # the blind restorations report the predicted QF too
            blind = [restore(model, L, device=device) for L in inputs]
            predicted = [qf_pred for _, qf_pred in blind]
            psnr_rows.append(_psnr_row(qf, images, inputs, [E for E, _ in blind], model,
                                       args.qf_input, device))
        else:
            predicted = [predict_qf(model, L, device=device) for L in inputs]
        per_image += [{"image": os.path.basename(path), "qf": qf, "predicted": pred}
                      for path, pred in zip(paths, predicted)]
        rows.append({"qf": qf, "mean": float(np.mean(predicted)), "min": int(min(predicted)),
                     "max": int(max(predicted)),
                     "mae": float(np.mean(np.abs(np.array(predicted) - qf))),
                     "medae": float(np.median(np.abs(np.array(predicted) - qf)))})
    sampling = f", chroma {args.sampling}" if args.sampling and channels == 3 else ""
    print(f"QF head of {args.model} on {testset} ({len(images)} images{sampling}), "
          f"device {device}:")
    print_table(rows, COLUMNS)
    result = {"model": args.model, "testset": testset, "sampling": args.sampling,
              "rows": rows, "images": per_image}
    if active is not None:
        units = [{"layer": name, "units": int(seen.numel()),
                  "active": float(seen.float().mean())} for name, seen in active.items()
                 if seen is not None]
        print("\nQF MLP units active on at least one input:")
        print_table(units, [("layer", "ReLU", "{}"), ("units", "units", "{}"),
                            ("active", "share active", "{:.3f}")])
        result["units"] = units
    if args.qf_input:
        print("\nmean PSNR (dB) blind and with each qf_input:")
        print_table(psnr_rows, [("qf", "true QF", "{}"), ("jpeg", "JPEG", "{:.2f}"),
                                ("blind", "blind", "{:.2f}")]
                    + [(f"qf_input {q}", f"qf_input {q}", "{:.2f}") for q in args.qf_input])
        result["psnr"] = psnr_rows
    if args.json:
        write_json(args.json, result)
    return 0


def _watch_units(net):
    """Forward hooks on the ReLUs of `qf_pred` and `qf_embed`: {name: bool tensor of the units
    active on some input so far (None before the first pass)}."""
    active = {}
    for part in ("qf_pred", "qf_embed"):
        for index, layer in enumerate(getattr(net, part)):
            if isinstance(layer, torch.nn.ReLU):
                name = f"{part}.{index}"
                active[name] = None

                def hook(module, inputs, output, name=name):
                    seen = (output.detach() > 0).reshape(output.shape[0], -1).any(0).cpu()
                    active[name] = seen if active[name] is None else active[name] | seen
                layer.register_forward_hook(hook)
    return active


def _psnr_row(qf, images, inputs, blind, model, qf_inputs, device):
    """Mean PSNR of the JPEG inputs, the blind restorations and each `qf_input`, at one true QF."""
    row = {"qf": qf, "jpeg": float(np.mean([psnr(L, H) for L, H in zip(inputs, images)])),
           "blind": float(np.mean([psnr(E, H) for E, H in zip(blind, images)]))}
    for q in qf_inputs:
        row[f"qf_input {q}"] = float(np.mean([psnr(restore(model, L, qf=q, device=device)[0], H)
                                              for L, H in zip(inputs, images)]))
    return row


if __name__ == "__main__":
    sys.exit(run_cli(main))
