"""``cmdeploy serve``: the annotation loop in a browser, on the torch-free runtime.

Modules (FastAPI and uvicorn are imported only by :mod:`app` and :mod:`api`; the ``[serve]`` extra):

* :mod:`cmdeploy.serve.masks` - mask <-> run-length code, outer contour polygon (NumPy only).
* :mod:`cmdeploy.serve.batching` - :class:`MicroBatcher`: one shared ``Segmenter``, concurrent
  requests gathered into ``predict_batch`` calls.
* :mod:`cmdeploy.serve.catalog` - the series under ``--data`` (opaque ids, never paths).
* :mod:`cmdeploy.serve.store` - accepted objects per series, propagation, export.
* :mod:`cmdeploy.serve.cvat` - CVAT's serverless interactor contract (no FastAPI).
* :mod:`cmdeploy.serve.schemas` - request/response models (pydantic) of ``/api/v1``.
* :mod:`cmdeploy.serve.api` / :mod:`cmdeploy.serve.app` - routes and the app factory.

Coordinates everywhere: ``x`` = column, ``y`` = row of the displayed slice, pixel centres at
integers (the points-CSV convention); masks are ``[y, x]``.
"""
