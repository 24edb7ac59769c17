"""Correcting ``xarray`` states with the layout the model's metadata states.

A forecast model written in Python holds its state as named fields (temperature
on levels, surface pressure, ...); the service wants one array in the model's
packing. Nobody should guess that order: the metadata carries the layout
(``parameters.layout``) and :func:`layout_from_metadata` rebuilds it, and
:meth:`FieldClient.correct` stacks a dataset's fields in it, calls the service,
and returns the correction as a dataset of the same fields (units per the
caller's ``dt_unit``). The stacking is :class:`correction.layout.ModelLayout`'s
own (that module imports neither torch nor xarray at run time), so client and
server cannot disagree about it.
"""

from __future__ import annotations

from typing import Any

from correction.layout import ModelLayout

from .client import CorrectionClient


def layout_from_metadata(metadata: dict[str, Any]) -> ModelLayout:
    """The model's state layout from its metadata (a clear error for an old server)."""
    layout = (metadata.get("parameters") or {}).get("layout")
    if not layout:
        raise ValueError(
            f"model '{metadata.get('name')}' metadata states no layout (a server from "
            "before layouts were published); stack the state by hand"
        )
    return ModelLayout.from_dict(layout)


class FieldClient:
    """A :class:`CorrectionClient` that takes and returns ``xarray`` datasets of fields."""

    def __init__(self, client: CorrectionClient) -> None:
        self.client = client
        self.layout = layout_from_metadata(client.metadata())

    def correct(self, ds: Any, batch_dim: str = "member", dt: float | None = None) -> Any:
        """The correction of every state in ``ds`` (fields with a leading ``batch_dim``)."""
        import numpy as np

        state = self.layout.dataset_to_state(ds, batch_dim).astype(np.float64)
        corr = self.client.correct(state, dt=dt)
        unit = self.client.dt_unit or "unit time"
        return self.layout.state_to_dataset(corr, ds, batch_dim, suffix_units=f" per {unit}")
