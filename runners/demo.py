"""The web demo behind `app.py`: try FBCNN in the browser, locally (Gradio).

This module owns what the demo page does and how it is served:
- models: the `--model` given, else the first of `DEMO_MODEL_ORDER` in the model folder
  (`model_zoo/` or $FBCNN_MODEL_DIR); nothing is downloaded unless `--model` names a missing
  zoo model; with none the page says how to get one. Each is loaded once, on first use;
- reading: uploads over `--max-megapixels` are refused from their header, then read as
  main_restore reads them (utils/image_file.py); a bad file is a message in the page naming
  it, never a traceback;
- restoring: blind first (the network's QF shown and put on the slider), then again with the
  slider's QF whenever it is released; made consistent with a JPEG's file as main_restore
  does (models/consistency.py; `--no-projection` turns it off), with main_restore's engine;
- output: a before/after slider and the restored PNG, in a private temporary folder removed
  at exit, with the samples (testsets/Real and a LIVE1 crop at QF 10).
The Gradio import is deferred to `build_ui` and `main`, so the logic imports without it.
"""
import argparse
import atexit
import html
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np

from data.jpeg import jpeg_encode
from models.consistency import file_coefficients, restore_consistent
from models.engines import ENGINES, check_engine, fastest_options
from models.inference import CPU_PLANS, DEFAULT_TILE, fit_overlap, plan_tile, resolve_device
from models.model_zoo import (JPEG_MODEL, MODEL_ZOO, load_model, local_weight_file,
                              model_folder, model_label)
from runners.cli import DEVICE_HELP, bounded_int, non_negative_float, tile_size
from utils import REPO_ROOT
from utils.errors import UserError
from utils.fileio import display_path
from utils.image import ImageReadError, check_image_bytes, imread_uint, imwrite
from utils.image_file import read_image
from utils.image_meta import apply_orientation
from utils.logger import setup_logging

__all__ = ["DEMO_MODEL_ORDER", "DEFAULT_PORT", "ModelChoices", "Result", "Demo",
           "find_models", "prepare_samples", "build_ui", "build_parser", "main"]

LOG = logging.getLogger(f"fbcnn.{__name__}")

# Preferred first: the released weights where they are at hand, else the bundled lite model.
DEMO_MODEL_ORDER = ("fbcnn_color", "fbcnn_color_lite", "fbcnn_gray", "fbcnn_gray_lite",
                    "fbcnn_gray_double")
DEFAULT_PORT = 7860
TESTSETS = os.path.join(REPO_ROOT, "testsets")
NO_MODEL_HELP = ("**No model available.** Put `fbcnn_color.pth` (the released weights) in "
                 "`model_zoo/`, or restart with `python app.py --model PATH_OR_NAME`: a "
                 "`.pth`/`.safetensors` FBCNN state dict, or a model name "
                 "(`fbcnn_color` downloads the released weights, about 288 MB).")
LITE_NOTE = ("A lite model trained on a 2-core CPU (docs/models.md): it removes fewer "
             "artifacts than the released models. With the projection onto the file's DCT (on "
             "by default) it leaves photos' JPEGs of every quality, QF 10 to 100, at least as "
             "good as they came (on LIVE1 and Classic5 no image lost more than 0.1 dB); "
             "graphics (screenshots, scans, line art) it can make worse.")
CSS = "#error { color: var(--error-text-color); }"
OUTPUT_MAX_AGE_S = 3600  # restored PNGs older than this are deleted from the work folder


def _weight_file(name, model_dir):
    """The weight file of `name` in `model_dir`, or None when it is not there."""
    if name in MODEL_ZOO:
        return local_weight_file(name, model_dir)
    for ext in (".safetensors", ".pth"):  # a model not (yet) registered in the zoo
        path = os.path.join(model_dir, name + ext)
        if os.path.isfile(path):
            return path
    return None


def find_models(model_dir=None, requested=None):
    """`{label: what load_model takes}` in the order the model menu shows them.

    `requested` (the `--model` argument) comes first; then every name of DEMO_MODEL_ORDER whose
    file is in `model_dir`. A zoo name is kept as a name, so load_model checks its sha256.
    """
    model_dir = model_folder(model_dir)
    found = {}
    if requested:
        if requested == JPEG_MODEL:
            raise UserError(f"--model {JPEG_MODEL}: the demo needs a network; give a zoo name "
                            f"({', '.join(MODEL_ZOO)}) or a .pth/.safetensors file")
        found[model_label(requested)] = requested
    for name in DEMO_MODEL_ORDER:
        path = _weight_file(name, model_dir)
        if path and name not in found:
            found[name] = name if name in MODEL_ZOO else path
    return found


class ModelChoices:
    """The models the page offers, each loaded once, on first use."""

    def __init__(self, specs, device="cpu", model_dir=None):
        self.specs = dict(specs)
        self.device = device
        self.model_dir = model_dir
        self._loaded = {}

    @property
    def labels(self):
        return list(self.specs)

    @property
    def default(self):
        return next(iter(self.specs), None)

    def get(self, label):
        """The LoadedModel for `label`; raises UserError when unknown or not loadable."""
        if not label:
            raise UserError("no model is loaded: restart with `python app.py --model "
                            "PATH_OR_NAME` (see the note at the top of the page)")
        if label not in self.specs:
            raise UserError(f"model {label!r} is not offered; choose one of "
                            f"{', '.join(self.specs) or '(none)'}")
        if label not in self._loaded:
            LOG.info("loading %s on %s", self.specs[label], self.device)
            self._loaded[label] = load_model(self.specs[label], device=self.device,
                                             model_dir=self.model_dir)
        return self._loaded[label]

    def describe(self, label):
        """One line of Markdown about `label`: architecture and device, or why it won't load."""
        if not label:
            return NO_MODEL_HELP
        try:
            net = self.get(label).net
        except UserError as exc:
            return f"**Model `{label}` cannot be loaded:** {exc}"
        params = sum(p.numel() for p in net.parameters())
        colour = "colour" if net.in_nc == 3 else "grayscale"
        entry = MODEL_ZOO.get(self.specs[label])
        note = f" {LITE_NOTE}" if entry is not None and entry.bundled else ""
        return (f"Model **{label}**: {colour}, nc {'-'.join(map(str, net.nc))}, nb {net.nb}, "
                f"{params / 1e6:.2f} M parameters, on {self.device}.{note}")


def prepare_samples(folder, testsets=TESTSETS):
    """Write the sample inputs into `folder`; returns `{label: path}`.

    The JPEGs of testsets/Real as they are, and a 256x256 crop of LIVE1's monarch compressed
    at QF 10 (OpenCV, as in the paper's protocol). Missing test sets are skipped.
    """
    os.makedirs(folder, exist_ok=True)
    samples = {}
    live1 = os.path.join(testsets, "LIVE1_color", "monarch.png")
    if os.path.isfile(live1):
        crop = imread_uint(live1)[128:384, 256:512]
        path = os.path.join(folder, "monarch_crop_qf10.jpg")
        with open(path, "wb") as f:
            f.write(jpeg_encode(crop, 10))
        samples["LIVE1 monarch crop, JPEG QF 10"] = path
    real = os.path.join(testsets, "Real")
    if os.path.isdir(real):
        for name in sorted(os.listdir(real)):
            if name.lower().endswith((".jpg", ".jpeg")):
                path = os.path.join(folder, "real_" + name)
                shutil.copyfile(os.path.join(real, name), path)
                samples[f"Real {name}"] = path
    return samples


@dataclass
class Result:
    """One restoration: the input as the network saw it, the output and how it was made."""
    before: np.ndarray
    after: np.ndarray
    qf_pred: int
    qf_used: object  # the slider's QF, or None for blind
    png_path: str
    seconds: float
    tile: object  # tile size in pixels it started with, or None
    consistency: str = ""  # what the projection did (runners.restore.make_consistent)

    def info_markdown(self):
        h, w = self.after.shape[:2]
        how = (f"QF {self.qf_pred} (blind)" if self.qf_used is None
               else f"QF {self.qf_used} (set by the slider)")
        tiled = f" · tiled, {self.tile} px" if self.tile else ""
        consistency = f" · {self.consistency}" if self.consistency else ""
        return (f"Predicted QF: **{self.qf_pred}** · restored with **{how}**{consistency} · "
                f"{w}×{h} px · {self.seconds:.2f} s{tiled}")


class Demo:
    """What the page does, independent of Gradio: read an upload, restore it, write the PNG."""

    def __init__(self, models, work_dir, tile=None, max_megapixels=24.0, projection=True,
                 engine=None):
        self.models = models
        self.projection = projection  # a JPEG's result projected onto its file's DCT intervals
        self.work_dir = work_dir
        self.tile = tile  # None: restore() decides
        # the engine and layout main_restore uses (an engine asked for is checked now)
        self.speed = fastest_options({} if engine is None else {"engine": engine},
                                     models.device)
        try:
            check_engine(self.speed.get("engine", "torch"), "fp32", models.device)
        except ValueError as exc:
            raise UserError(f"--engine: {exc}") from None
        self.max_megapixels = max_megapixels
        os.makedirs(os.path.join(work_dir, "outputs"), exist_ok=True)

    def read(self, path, in_nc=3):
        """An upload as a `runners.restore.Decoded` (pixels as stored, RGB for in_nc 3, gray
        for 1); UserError names the file."""
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                header = check_image_bytes(f.read(), name)
        except OSError as exc:
            raise UserError(f"{name}: cannot read the upload ({exc.strerror or exc})") from None
        if header is None:  # a format whose size cannot be read before decoding: no bombs
            raise UserError(f"{name}: not an image the demo takes (PNG, JPEG, BMP, GIF, WebP, "
                            "TIFF or PNM, whose size is checked before decoding)")
        limit = self.max_megapixels * 1e6
        if header.pixels > limit:
            raise UserError(f"{name}: {header.width}x{header.height} pixels is over the demo's "
                            f"limit of {self.max_megapixels:g} megapixels (--max-megapixels)")
        try:
            decoded = read_image(path, "gray" if in_nc == 1 else "color")
        except ImageReadError as exc:  # it names the temporary path; the user knows the name
            raise UserError(str(exc).replace(display_path(path), name)) from None
        img = decoded.img
        if img.shape[0] * img.shape[1] > limit:
            raise UserError(f"{name}: {img.shape[1]}x{img.shape[0]} pixels is over the demo's "
                            f"limit of {self.max_megapixels:g} megapixels (--max-megapixels)")
        return decoded

    def run(self, path, model_label, qf=None):
        """Restore the file at `path` with the model `model_label`, blind or at `qf`."""
        if not path:
            raise UserError("upload an image or pick a sample first")
        model = self.models.get(model_label)
        decoded = self.read(path, model.in_nc)
        if qf is not None and not 1 <= int(qf) <= 100:
            raise UserError(f"QF {qf}: must be between 1 and 100")
        overlap = fit_overlap(self.tile)
        tile = plan_tile(decoded.img.shape, self.models.device, self.tile, overlap,
                         net=model.net)[0]
        start = time.perf_counter()
        coefficients, consistency, problem = (None, "", None) if model.net is None else \
            file_coefficients(decoded.data, self.projection)
        after, qf_pred = restore_consistent(model, decoded.img, coefficients,
                                            qf=None if qf is None else int(qf),
                                            device=self.models.device, tile=self.tile,
                                            tile_overlap=overlap, **self.speed)
        consistency += f" ({problem})" if problem else ""
        seconds = time.perf_counter() - start
        img = apply_orientation(decoded.img, decoded.orientation)
        after = apply_orientation(after, decoded.orientation)
        stem = os.path.splitext(os.path.basename(path))[0][:100]  # within 255 bytes, temp name too
        suffix = "blind" if qf is None else f"qf{int(qf)}"
        png_path = self._output_path(f"{stem}_{model_label}_{suffix}.png")
        imwrite(png_path, after)
        return Result(img, after, qf_pred, None if qf is None else int(qf), png_path, seconds,
                      tile, consistency)

    def _output_path(self, name):
        """A fresh folder for one PNG (its name is what the browser saves); old ones go."""
        outputs = os.path.join(self.work_dir, "outputs")
        now = time.time()
        for entry in os.scandir(outputs):
            if now - entry.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        folder = os.path.join(outputs, uuid.uuid4().hex)
        os.makedirs(folder)
        return os.path.join(folder, name)

    # Gradio callbacks: each returns updates for OUTPUTS = (compare, download, info, error,
    # qf slider) and reports a bad file in the page rather than raising.

    def on_input(self, path, model_label):
        """A new image, a sample or another model: the blind result."""
        return self._respond(path, model_label, None)

    def on_qf(self, path, model_label, qf):
        """The slider was released: restore again with its QF as qf_input."""
        return self._respond(path, model_label, qf)

    def on_sample(self, label, samples):
        """A sample picked from the menu: becomes the file input (whose change runs it)."""
        return samples.get(label)

    def on_model(self, path, model_label):
        """Another model: its description, and the blind result when an image is loaded."""
        return (self.models.describe(model_label),
                *(self._respond(path, model_label, None) if path else self._empty("")))

    def _respond(self, path, model_label, qf):
        import gradio as gr
        if not path:
            return self._empty("")
        try:
            result = self.run(path, model_label, qf)
        except Exception as exc:  # shown in the page as one line, never as a traceback
            if isinstance(exc, UserError):
                message = str(exc)
            else:
                LOG.exception("restoring %s failed", path)
                message = (f"restoring failed ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"see the server log")
            message = html.escape(message)  # file names are text, not markup
            gr.Warning(message)
            return self._empty(f"**Error:** {message}")
        return ((result.before, result.after),
                gr.update(value=result.png_path, interactive=True),
                result.info_markdown(), "",
                gr.update(value=result.qf_used if qf is not None else result.qf_pred))

    @staticmethod
    def _empty(error):
        import gradio as gr
        return None, gr.update(value=None, interactive=False), "", error, gr.update()


def build_ui(demo, samples):
    """The Gradio page for `demo` (a Demo) with the `samples` menu ({label: path})."""
    import gradio as gr
    with gr.Blocks(title="FBCNN demo", analytics_enabled=False,
                   delete_cache=(OUTPUT_MAX_AGE_S, OUTPUT_MAX_AGE_S)) as page:
        gr.Markdown("# FBCNN: flexible blind JPEG artifact removal\n"
                    "FBCNN predicts the JPEG quality factor (QF) of an image and removes the "
                    "artifacts accordingly. Move the QF slider to override the prediction: a "
                    "lower QF removes more artifacts, a higher one keeps more detail.")
        model_status = gr.Markdown(demo.models.describe(demo.models.default),
                                   elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="Image (JPEG, PNG, ...)", file_types=["image"],
                               type="filepath", elem_id="upload")
                sample = gr.Dropdown(list(samples), value=None, label="Or pick a sample",
                                     elem_id="sample")
                model = gr.Dropdown(demo.models.labels, value=demo.models.default,
                                    label="Model", elem_id="model",
                                    interactive=bool(demo.models.labels))
                qf = gr.Slider(1, 100, value=50, step=1, label="QF fed to the network",
                               info="Set to the predicted QF after each upload; release it to "
                                    "restore with that QF.", elem_id="qf")
                blind = gr.Button("Blind again (use the predicted QF)", elem_id="blind")
                info = gr.Markdown("", elem_id="qf-info")
                error = gr.Markdown("", elem_id="error")
                download = gr.DownloadButton("Download the restored PNG", interactive=False,
                                             elem_id="download")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(label="JPEG input | restored", type="numpy",
                                         format="png", buttons=["fullscreen"],
                                         elem_id="compare", max_height=600)
        outputs = [compare, download, info, error, qf]
        one_at_a_time = dict(concurrency_id="restore")  # all restorations share one worker
        sample.change(lambda label: demo.on_sample(label, samples), sample, file)
        file.change(demo.on_input, [file, model], outputs, **one_at_a_time)
        blind.click(demo.on_input, [file, model], outputs, **one_at_a_time)
        qf.release(demo.on_qf, [file, model, qf], outputs, trigger_mode="always_last",
                   **one_at_a_time)
        model.change(demo.on_model, [file, model], [model_status, *outputs], **one_at_a_time)
    return page


def _theme():
    import gradio as gr
    # system fonts: the default theme's web fonts would be fetched from the internet
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def _free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_parser(prog=None):
    parser = argparse.ArgumentParser(
        prog=prog, description="FBCNN web demo: restore JPEGs in the browser, with a QF slider.")
    parser.add_argument("--model", help="a zoo name (" + ", ".join(MODEL_ZOO) + ") or a "
                        ".pth/.safetensors FBCNN state dict; default: the first of "
                        + ", ".join(DEMO_MODEL_ORDER) + " present in model_zoo/")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=bounded_int(0, 65535), default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help=DEVICE_HELP)
    parser.add_argument("--tile", type=tile_size, default=None, metavar="N",
                        help="restore every image in tiles of at most this many pixels (default: "
                             "untiled, but on CPU each model's tiles above its limit, "
                             f"{CPU_PLANS[16].max_untiled_megapixels:g} megapixels for the lite "
                             f"models and {CPU_PLANS[64].max_untiled_megapixels:g} for the "
                             f"released ones, and {DEFAULT_TILE['cuda']}-pixel tiles on CUDA when "
                             "out of memory)")
    parser.add_argument("--projection", action=argparse.BooleanOptionalAction, default=True,
                        help="project a JPEG's restoration onto the quantization intervals of "
                             "its file's DCT coefficients, as main_restore does (default: on)")
    parser.add_argument("--max-megapixels", type=non_negative_float, default=24.0,
                        help="refuse uploads larger than this (default 24)")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="who runs the network, as main_restore's --engine (default: "
                             "auto on a CPU where openvino is installed, else torch)")
    return parser


def main(argv=None):
    """Serve the demo until interrupted; returns the exit status."""
    args = build_parser(prog="app.py").parse_args(argv)
    undo_logging = setup_logging(console_format="%(levelname)s %(name)s: %(message)s",
                                 stream=sys.stdout, error_stream=sys.stderr)
    try:
        return _serve(args)
    finally:
        undo_logging()


def _serve(args):
    """Start the page for `args` and block until Ctrl+C or SIGTERM; returns the exit status."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: gradio is not installed; pip install -r requirements-demo.txt",
              file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        if args.max_megapixels <= 0:
            raise UserError("--max-megapixels must be positive")
        models = ModelChoices(find_models(requested=args.model), device=device)
        if args.model:
            models.get(models.default)  # a model asked for by name must load, or we stop here
        elif models.default is None:
            LOG.warning("no model found in model_zoo/; the page will say so (see --model)")
        work_dir = tempfile.mkdtemp(prefix="fbcnn-demo-")
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
        demo = Demo(models, work_dir, tile=args.tile, max_megapixels=args.max_megapixels,
                    projection=args.projection, engine=args.engine)
        samples = prepare_samples(os.path.join(work_dir, "samples"))
        page = build_ui(demo, samples)
        try:
            port = _free_port(args.host) if args.port == 0 else args.port
        except OSError as exc:  # an address this machine does not have, or no such name
            raise UserError(f"--host {args.host}: cannot serve on it "
                            f"({exc.strerror or exc})") from None
        page.queue(default_concurrency_limit=1)
        try:
            _, url, _ = page.launch(server_name=args.host, server_port=port, quiet=True,
                                    prevent_thread_lock=True, theme=_theme(), css=CSS,
                                    allowed_paths=[work_dir], max_file_size="100mb")
        except OSError:  # Gradio's message names its own environment variables, not our flags
            raise UserError(f"--port {port}: cannot serve on {args.host} (the port is in use "
                            f"or not allowed, or the address is not this machine's); try "
                            f"another port, or --port 0 for a free one") from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"FBCNN demo running at {url} (model: {models.default or 'none'}, device: "
          f"{device}); Ctrl+C to stop", flush=True)
    # SIGTERM (a test or a service manager stopping us) ends like Ctrl+C, so the work folder goes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0
