"""Nuclio handler for CVAT: cmdeploy as a serverless interactor (four extreme points -> mask).

The same contract as ``POST /`` of ``cmdeploy serve`` (see cmdeploy/serve/cvat.py): CVAT posts
``{"image": base64, "pos_points": [[x, y] x 4], "neg_points": [...]}`` and gets
``{"mask": ..., "points": polygon}``.
"""

import json

from cmdeploy import Segmenter
from cmdeploy.errors import InputError
from cmdeploy.serve.cvat import handle


def init_context(context):
    context.user_data.segmenter = Segmenter.load()  # the embedded default model


def handler(context, event):
    body = event.body if isinstance(event.body, dict) else json.loads(event.body)
    try:
        answer, status = handle(context.user_data.segmenter, body), 200
    except InputError as exc:
        answer, status = {"error": str(exc)}, 400
    return context.Response(
        body=json.dumps(answer), headers={}, content_type="application/json", status_code=status
    )
