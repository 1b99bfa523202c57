"""``lpvit eval``: top-1 accuracy of an ONNX model."""

from __future__ import annotations

import json

from .loading import evaluation_loader, from_timm
from .ui import Ui


def cmd_eval(args, ui: Ui) -> int:
    import onnx

    from ..runtime.sessions import default_threads, ort_session
    from ..tools.data import data_config_of
    from ..tools.evaluate import evaluate
    from ..lowering.onnx_export import DATA_CONFIG_KEY

    session = ort_session(args.model, args.threads or default_threads(), True)
    if args.preprocess_as:
        data_config = data_config_of(from_timm(args.preprocess_as, pretrained=False))
    else:
        props = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
        data_config = json.loads(props[DATA_CONFIG_KEY]) if DATA_CONFIG_KEY in props else None
    loader = evaluation_loader(args.data, data_config, session.get_inputs()[0].shape[1:], args.limit)
    with ui.bar("eval", len(loader.dataset)) as advance:
        top1 = evaluate(session, loader, progress=advance)
    ui.out.print(f"top-1 {top1:.4f} on {len(loader.dataset)} images of {args.data}")
    return 0
