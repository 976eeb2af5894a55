"""`GET /v1/defaults`: what each field a request leaves out resolves to, per mode, on this server's model."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.deps import DefaultsDep, SettingsDep, get_owner
from server.schemas import DefaultsOut

router = APIRouter(tags=["generations"], dependencies=[Depends(get_owner)])


@router.get("/v1/defaults", response_model=DefaultsOut, summary="Defaults per mode (size, steps, thoughts)")
async def get_defaults(defaults: DefaultsDep, settings: SettingsDep) -> DefaultsOut:
    """The model's serving defaults, capped by this deployment's limits, as `POST /v1/generations` applies them."""
    caps = {
        "width": settings.max_side,
        "height": settings.max_side,
        "steps": settings.max_steps,
        "max_think_tokens": settings.max_think_tokens,
    }
    modes = {
        m: {k: (min(v, caps[k]) if k in caps else v) for k, v in d.to_dict().items()} for m, d in defaults.modes.items()
    }
    return DefaultsOut.model_validate({"source": defaults.source, "modes": modes})
