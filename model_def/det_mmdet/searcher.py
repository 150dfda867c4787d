"""A searcher's early stop, heard by the trial.

Determined 0.38.1's master records an adaptive ASHA stop by moving the trial to ``STOPPING_COMPLETED``
and sends its running allocation no signal (``master/internal/trial.go``, ``transition``: only the
canceled, killed and errored stopping states signal the allocation), and the 0.38 harness has no
searcher call left to learn of it. A trial ASHA has dropped would train on to the searcher's
``max_time``, holding its slots. ASHA decides when a validation is reported, and a validation's
checkpoint (policy ``all``) is written after that report; so at each checkpoint's end, and at each
training report for a decision that came later, the chief asks the master for the trial's state. On
a stop every rank requests the trial's end, and Determined's loop checkpoints (if the last checkpoint
is not current) and exits 0, which the master records as completed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import determined as det
from determined import pytorch
from determined.common.api import authentication, certs

logger = logging.getLogger("det_mmdet")

STOPPED = "STATE_STOPPING_COMPLETED"


class SearcherStop(pytorch.PyTorchCallback):
    """On a cluster: end the trial at the first report boundary after the searcher stopped it."""

    def __init__(self, context: pytorch.PyTorchTrialContext, info: det.ClusterInfo, batches: Callable[[], int]) -> None:
        self.context, self.trial_id, self.batches = context, info.trial.trial_id, batches
        self.session = None
        if context.distributed.rank == 0:
            cert = certs.default_load(info.master_url)
            self.session = authentication.login_from_task(master_address=info.master_url, cert=cert)

    def _ask(self) -> None:
        state = ""
        if self.session is not None:
            state = str(self.session.get(f"/api/v1/trials/{self.trial_id}").json()["trial"].get("state", ""))
        if self.context.distributed.broadcast(state == STOPPED) and not self.context.get_stop_requested():
            logger.info("the searcher stopped this trial; it ends at batch %d", self.batches())
            self.context.set_stop_requested(True)

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self._ask()

    def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: Any) -> None:
        self._ask()
