"""The Gradio layout of ``realisr serve`` (the ``ui`` extra). The work is in :mod:`realisr.ui.engine`; this
module only lays out components and wires events.

The dial controls are built from the models' dial descriptions (:func:`realisr.dials.dials_for`): one control
per distinct dial name across the offered models, shown for the models that have it, with that model's range
and default. Moving a *cheap* dial after a run re-renders from the kept state (no network pass); other changes
update the estimate and wait for "Run". Heavy events share one queue slot per device (one job at a time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..dials import Dial
from ..errors import MissingExtraError, RealisrError
from .engine import Cancelled, Engine, redact

try:  # this module is the Gradio layout: imported only by `realisr serve` and tests
    import gradio as gr
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MissingExtraError("ui", "gradio") from e

logger = logging.getLogger(__name__)

__all__ = ["build_app", "launch"]

_CSS = """
#loupe{display:flex;gap:8px;align-items:flex-start;flex-wrap:wrap}
#loupe .lens{width:192px;height:192px;border:1px solid #999;background-repeat:no-repeat;
  image-rendering:pixelated;background-color:#f4f4f4}
#loupe .cap{font-size:12px;color:#666;width:100%}
"""

# A synced 1:1 magnifier: the pointer over the before/after slider shows the same spot of both images at
# their own pixel size (CSS background of each full-resolution image, no resampling).
_HEAD = """
<script>
(function(){
  function lensUpdate(e){
    var box = e.target && e.target.closest ? e.target.closest('#result') : null;
    if(!box) return;
    var imgs = box.querySelectorAll('img');
    if(imgs.length < 2) return;
    var ref = imgs[0].getBoundingClientRect();
    if(!ref.width || !ref.height) return;
    var fx = (e.clientX - ref.left) / ref.width, fy = (e.clientY - ref.top) / ref.height;
    if(fx < 0 || fy < 0 || fx > 1 || fy > 1) return;
    [['lens-before', imgs[0]], ['lens-after', imgs[1]]].forEach(function(p){
      var lens = document.getElementById(p[0]), img = p[1];
      if(!lens || !img.naturalWidth) return;
      var nw = img.naturalWidth, nh = img.naturalHeight, lw = lens.clientWidth, lh = lens.clientHeight;
      lens.style.backgroundImage = 'url("' + img.src + '")';
      lens.style.backgroundSize = nw + 'px ' + nh + 'px';
      lens.style.backgroundPosition = (lw / 2 - fx * nw) + 'px ' + (lh / 2 - fy * nh) + 'px';
      lens.dataset.x = Math.round(fx * nw); lens.dataset.y = Math.round(fy * nh);
    });
  }
  document.addEventListener('mousemove', lensUpdate, {passive: true});
})();
</script>
"""

_LOUPE = """<div id="loupe"><div class="lens" id="lens-before" title="input, 1:1"></div>
<div class="lens" id="lens-after" title="result, 1:1"></div>
<div class="cap">1:1 magnifier: point at the result (left: input, right: result)</div></div>"""


def _union(engine: Engine) -> list[Dial]:
    seen: dict = {}
    for m in engine.models:
        for d in engine.dials(m).dials:
            seen.setdefault(d.name, d)
    return list(seen.values())


def _component(d: Dial, visible: bool):
    common = dict(label=d.label, info=d.help or None, visible=visible, elem_id=f"dial-{d.name}")
    if d.kind in ("float", "int", "seed") and d.default is None:  # empty = not passed (a Number would send 0)
        return gr.Textbox(value="", placeholder="empty: the model's default", lines=1, **common)
    if d.kind == "float" or (d.kind == "int" and d.minimum is not None and d.maximum is not None):
        return gr.Slider(minimum=d.minimum if d.minimum is not None else 0.0,
                         maximum=d.maximum if d.maximum is not None else 1.0,
                         step=d.step or (1 if d.kind == "int" else 0.01),
                         value=d.default, **common)
    if d.kind in ("int", "seed"):
        return gr.Number(value=d.default, precision=0, minimum=d.minimum, maximum=d.maximum, **common)
    if d.kind == "choice":
        return gr.Dropdown(choices=[lab for lab, _ in d.options()], value=d.label_of(d.default), **common)
    if d.kind == "bool":
        return gr.Checkbox(value=bool(d.default), **common)
    return gr.Textbox(value=d.default or "", lines=1, placeholder="" if d.default is not None else
                      "empty: the model's default", **common)


def _mask(editor_value, up) -> Optional[np.ndarray]:
    """The painted region as uint8 ``[H, W]`` at the upload's size (max alpha over the layers)."""
    if not isinstance(editor_value, dict):
        return None
    layers = [np.asarray(x) for x in (editor_value.get("layers") or []) if x is not None]
    layers = [x for x in layers if x.ndim == 3 and x.shape[2] == 4]
    if not layers:
        return None
    m = np.max(np.stack([x[..., 3] for x in layers]), axis=0).astype(np.uint8)
    if not m.any():
        return None
    if up is not None and m.shape != (up.height, up.width):
        from PIL import Image

        m = np.asarray(Image.fromarray(m, "L").resize((up.width, up.height), Image.NEAREST))
    return m


def build_app(engine: Engine):
    """The Gradio Blocks of ``realisr serve`` around ``engine``."""
    dials = _union(engine)
    names = [d.name for d in dials]
    model0 = engine.default_model()
    own0 = set(engine.dials(model0).names())
    spatial_all = sorted({d.name for d in dials if d.spatial})

    def values_of(model_id, vals) -> dict:
        mine = set(engine.dials(model_id).names())
        return {n: v for n, v in zip(names, vals) if n in mine}

    def session(request):
        return engine.session(request.session_hash)

    def current(s, pick):
        return s.uploads.get(pick) if pick else None

    def est_md(model_id, up, vals) -> str:
        if up is None:
            return "Upload a photo to see the output size, tiles, time and memory."
        try:
            e = engine.estimate(model_id, up, values_of(model_id, vals))
        except RealisrError as err:
            return f"**Refused:** {redact(err)}"
        return e.markdown() if e is not None else ""

    def status_md(model_id) -> str:
        ok, detail = engine.status(model_id)
        spec = engine.spec(model_id)
        head = f"**{model_id}**: {spec.description}"
        return f"{head}\n\n{'Weights: ready' if ok else 'Weights missing: ' + detail}"

    def recipe_of(s, model_id, pick, brush_dial, brush_value, fmt, vals):
        mask = s.masks.get(pick)
        return engine.recipe(model_id, values_of(model_id, vals), mask=mask, brush_dial=brush_dial,
                             brush_value=brush_value, ext=fmt)

    def outputs_of(s, res):
        before, after = engine.previews(s, res)
        o = res.output
        h, w = o.image.height, o.image.width
        what = ("re-dial from the kept predictions (no model pass)" if res.kind == "redial" else "full run")
        info = f"{what}: {res.seconds:.2f} s · {w} x {h} · {res.upload.name}"
        fmt = res.recipe.ext or "png"
        return ((str(before), str(after)), info, str(engine.write_result(s, fmt)), str(engine.write_recipe(s)))

    with gr.Blocks(title="realisr", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# realisr\nReal-world super-resolution with live dials. Files you upload are deleted when "
                    "you close this page.")
        with gr.Tabs():
            with gr.Tab("Restore", id="restore"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        files = gr.File(file_count="multiple", file_types=["image"], label="Photos",
                                        elem_id="upload")
                        pick = gr.Dropdown(choices=[], label="Image", elem_id="pick", interactive=True)
                        model = gr.Dropdown(choices=engine.choices(), value=model0, label="Model",
                                            elem_id="model", interactive=True)
                        status = gr.Markdown(status_md(model0), elem_id="model-status")
                        comps = {}
                        for d in dials:
                            if not d.advanced:
                                comps[d.name] = _component(d, d.name in own0)
                        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                            for d in dials:
                                if d.advanced:
                                    comps[d.name] = _component(d, d.name in own0)
                        with gr.Accordion("Paint a region", open=False, elem_id="paint",
                                          visible=bool(set(spatial_all) & own0)) as paint_box:
                            editor = gr.ImageEditor(type="numpy", sources=(), transforms=(), layers=False,
                                                    eraser=gr.Eraser(default_size=8), format="png",
                                                    brush=gr.Brush(colors=["#ff2a2a"], default_size=8,
                                                                   color_mode="fixed"),
                                                    label="Paint where the dial takes another value",
                                                    elem_id="brush")
                            spatial0 = [n for n in spatial_all if n in own0]
                            brush_dial = gr.Dropdown(choices=spatial0, value=spatial0[-1] if spatial0 else None,
                                                     label="Painted dial", elem_id="brush-dial", interactive=True)
                            b0 = engine.dials(model0).get(spatial0[-1]) if spatial0 else None
                            brush_value = gr.Slider(b0.minimum if b0 else 0.0, b0.maximum if b0 else 1.0,
                                                    value=b0.minimum if b0 else 0.0, step=(b0.step if b0 else 0.05),
                                                    label="Value inside the region", elem_id="brush-value")
                        estimate = gr.Markdown(est_md(model0, None, []), elem_id="estimate")
                        with gr.Row():
                            run = gr.Button("Run", variant="primary", elem_id="run")
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    with gr.Column(scale=2):
                        result = gr.ImageSlider(type="filepath", format="png", label="before / after",
                                                elem_id="result", interactive=False, max_height=640)
                        gr.HTML(_LOUPE, js_on_load=None, elem_id="loupe-box")
                        info = gr.Markdown("", elem_id="run-info")
                        with gr.Row():
                            fmt = gr.Radio(["png", "tif"], value="png", label="Format", elem_id="format")
                            dl = gr.DownloadButton("Download result", elem_id="download", interactive=True)
                            dl_recipe = gr.DownloadButton("Download settings", elem_id="download-recipe")
            with gr.Tab("Batch", id="batch"):
                gr.Markdown("The model and dials of the Restore tab (without painted regions) on every photo; "
                            "one zip with the outputs and the settings.")
                bfiles = gr.File(file_count="multiple", file_types=["image"], label="Photos",
                                 elem_id="batch-upload")
                brun = gr.Button("Run batch", variant="primary", elem_id="batch-run")
                binfo = gr.Markdown("", elem_id="batch-info")
                bzip = gr.DownloadButton("Download zip", elem_id="batch-zip")
        dial_list = [comps[n] for n in names]

        # -- handlers (Gradio injects gr.Request / gr.Progress only into positional parameters) ------------
        def on_upload(request: gr.Request, paths, model_id, *vals):
            s = session(request)
            if not paths:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                ups = engine.add_uploads(s, [(p, Path(p).name) for p in paths])
            except RealisrError as e:
                raise gr.Error(redact(e)) from None
            choices = [(f"{u.name} ({u.width} x {u.height})", u.key) for u in s.uploads.values()]
            up = ups[0]
            return (gr.update(choices=choices, value=up.key), None if up.refused else str(up.path),
                    est_md(model_id, up, vals))

        def on_pick(request: gr.Request, key, model_id, *vals):
            s = session(request)
            up = current(s, key)
            bg = None if up is None or up.refused else str(up.path)
            return bg, est_md(model_id, up, vals)

        def on_model(request: gr.Request, model_id, key):
            s = session(request)
            d = engine.dials(model_id)
            mine = {x.name: x for x in d.dials}
            ups = []
            for n in names:
                x = mine.get(n)
                if x is None:
                    ups.append(gr.update(visible=False))
                elif isinstance(comps[n], gr.Slider):
                    ups.append(gr.update(visible=True, value=x.default, minimum=x.minimum, maximum=x.maximum,
                                         label=x.label))
                elif x.kind == "choice":
                    ups.append(gr.update(visible=True, choices=[lab for lab, _ in x.options()],
                                         value=x.label_of(x.default), label=x.label))
                else:
                    ups.append(gr.update(visible=True, value="" if x.default is None else x.default, label=x.label))
            sp = d.spatial_names()
            defaults = [mine[n].default if n in mine else None for n in names]
            return (status_md(model_id), *ups, gr.update(visible=bool(sp)),
                    gr.update(choices=sp, value=sp[-1] if sp else None), brush_range(model_id, sp[-1] if sp else None),
                    est_md(model_id, current(s, key), defaults))

        def brush_range(model_id, name):
            """The region value's slider takes the painted dial's range (starting at its minimum)."""
            x = engine.dials(model_id).get(name) if name else None
            if x is None:
                return gr.update()
            return gr.update(minimum=x.minimum, maximum=x.maximum, step=x.step, value=x.minimum)

        def on_brush_dial(model_id, name):
            return brush_range(model_id, name)

        def on_estimate(request: gr.Request, model_id, key, *vals):
            return est_md(model_id, current(session(request), key), vals)

        def on_paint(request: gr.Request, ed, key):
            s = session(request)
            up = current(s, key)
            if up is not None:
                m = _mask(ed, up)
                if m is None:
                    s.masks.pop(key, None)
                else:
                    s.masks[key] = m

        def progress_cb(progress):
            def cb(ev):
                if ev.total:
                    progress((ev.current, ev.total), desc=ev.stage)
            return cb

        def do_render(s, key, recipe, progress):
            try:
                res = engine.render(s, key, recipe, progress_cb(progress))
            except Cancelled:
                return gr.skip(), "Cancelled.", gr.skip(), gr.skip()
            except RealisrError as e:
                raise gr.Error(redact(e)) from None
            return outputs_of(s, res)

        def on_run(request: gr.Request, model_id, key, brush_dial_v, brush_value_v, fmt_v, progress=gr.Progress(),
                   *vals):
            s = session(request)
            if current(s, key) is None:
                raise gr.Error("upload a photo first")
            try:
                recipe = recipe_of(s, model_id, key, brush_dial_v, brush_value_v, fmt_v, vals)
            except RealisrError as e:
                raise gr.Error(redact(e)) from None
            return do_render(s, key, recipe, progress)

        def on_live(request: gr.Request, model_id, key, brush_dial_v, brush_value_v, fmt_v, progress=gr.Progress(),
                    *vals):
            s = session(request)
            if current(s, key) is None or s.last is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                recipe = recipe_of(s, model_id, key, brush_dial_v, brush_value_v, fmt_v, vals)
            except RealisrError:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            if s.last.upload.key == key and recipe.to_json() == s.last.recipe.to_json():
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()  # nothing changed (e.g. an empty editor event)
            if not engine.can_redial(s, key, recipe):
                return gr.skip(), "Settings changed: press Run to apply them.", gr.skip(), gr.skip()
            return do_render(s, key, recipe, progress)

        def on_format(request: gr.Request, fmt_v):
            s = session(request)
            if s.last is None:
                return gr.skip(), gr.skip()
            s.last.recipe.ext = fmt_v
            return str(engine.write_result(s, fmt_v)), str(engine.write_recipe(s))

        def on_cancel(request: gr.Request):
            s = engine.sessions.get(request.session_hash)
            if s is not None:
                s.cancel.set()

        def on_batch_upload(request: gr.Request, paths):
            s = session(request)
            if not paths:
                s.batch_keys = []
                return ""
            try:
                ups = engine.add_uploads(s, [(p, Path(p).name) for p in paths])
            except RealisrError as e:
                raise gr.Error(redact(e)) from None
            s.batch_keys = [u.key for u in ups]
            refused = [u.refused for u in ups if u.refused]
            return f"{len(ups)} photo(s) ready." + "".join(f"\n\n**Refused:** {r}" for r in refused)

        def on_batch(request: gr.Request, model_id, fmt_v, progress=gr.Progress(), *vals):
            s = session(request)
            keys = s.batch_keys
            try:
                recipe = engine.recipe(model_id, values_of(model_id, vals), ext=fmt_v)
                zpath, failures = engine.batch(s, keys, recipe, progress_cb(progress))
            except Cancelled:
                return gr.skip(), "Cancelled."
            except RealisrError as e:
                raise gr.Error(redact(e)) from None
            msg = f"{len(keys) - len(failures)} of {len(keys)} done."
            msg += "".join(f"\n\n**Failed:** {f}" for f in failures)
            return str(zpath), msg

        def on_unload(request: gr.Request):
            engine.close_session(request.session_hash)

        # -- wiring ---------------------------------------------------------------------------------------
        heavy = dict(concurrency_id="device", concurrency_limit=1)
        live_inputs = [model, pick, brush_dial, brush_value, fmt, *dial_list]
        live_outputs = [result, info, dl, dl_recipe]
        files.upload(on_upload, [files, model, *dial_list], [pick, editor, estimate])
        pick.input(on_pick, [pick, model, *dial_list], [editor, estimate])
        model.input(on_model, [model, pick], [status, *dial_list, paint_box, brush_dial, brush_value, estimate])
        for c in dial_list:
            c.change(on_estimate, [model, pick, *dial_list], [estimate])
            c.input(on_live, live_inputs, live_outputs, trigger_mode="always_last", **heavy)
        # a finished stroke is an `input` of the editor (its `change` also fires when a new photo is set)
        gr.on([editor.input, editor.apply, editor.clear], on_paint, [editor, pick], None,
              trigger_mode="always_last").then(on_live, live_inputs, live_outputs, trigger_mode="always_last",
                                                **heavy)
        brush_dial.input(on_brush_dial, [model, brush_dial], [brush_value]).then(
            on_live, live_inputs, live_outputs, trigger_mode="always_last", **heavy)
        brush_value.input(on_live, live_inputs, live_outputs, trigger_mode="always_last", **heavy)
        run.click(on_run, live_inputs, live_outputs, **heavy)
        cancel.click(on_cancel, None, None, queue=False)
        fmt.input(on_format, [fmt], [dl, dl_recipe])
        bfiles.upload(on_batch_upload, [bfiles], [binfo])
        brun.click(on_batch, [model, fmt, *dial_list], [bzip, binfo], **heavy)
        demo.unload(on_unload)
    demo.realisr_engine = engine
    return demo


def launch(engine: Engine, *, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True,
           queue_size: int = 16):
    """Build and start the app; returns the Blocks (serving in the background when ``block=False``).

    Args:
        host: interface to bind (default: this machine only).
        port: TCP port (``None``: Gradio's default, 7860 or the next free one).
        queue_size: most jobs waiting in the device queue.
    """
    demo = build_app(engine)
    demo.queue(max_size=queue_size, default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True,
                show_error=True, max_file_size=int(engine.limits.max_upload_mb * 1e6), footer_links=[],
                allowed_paths=[str(engine.root)], ssr_mode=False, css=_CSS, head=_HEAD)
    return demo
