"""Assets shipped inside the package: pretrained models and behaviour policies, each a
directory with a card.json.

    dtsweep/assets/models/<name>/card.json      kind "language" or "image" (GPT2LMHeadModel dirs)
    dtsweep/assets/behaviour/<name>/card.json   kind "behaviour" (the card names its "env")
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
MODEL_KINDS = ("language", "image")


def list_assets() -> list[dict]:
    """Every shipped asset as {"name", "kind", "path", "card"}, models first, then by name.

    "name" is the directory's name, "kind" is "language" | "image" | "behaviour", "path" the
    directory (str) and "card" its parsed card.json.
    """
    assets = []
    for card_path in sorted(ASSETS_DIR.glob("models/*/card.json")):
        card = json.loads(card_path.read_text())
        if card.get("kind") not in MODEL_KINDS:
            raise ValueError(f"{card_path}: kind must be one of {MODEL_KINDS}, got {card.get('kind')!r}")
        assets.append(_entry(card_path, card["kind"], card))
    for card_path in sorted(ASSETS_DIR.glob("behaviour/*/card.json")):
        card = json.loads(card_path.read_text())
        if "env" not in card:
            raise ValueError(f"{card_path}: a behaviour card must name its env")
        assets.append(_entry(card_path, "behaviour", card))
    return assets


def _entry(card_path: Path, kind: str, card: dict) -> dict:
    return {"name": card_path.parent.name, "kind": kind, "path": str(card_path.parent), "card": card}


def asset_path(name: str) -> Path:
    """The directory of the shipped asset called `name` (e.g. "chibit"); KeyError if none."""
    for asset in list_assets():
        if asset["name"] == name:
            return Path(asset["path"])
    known = ", ".join(a["name"] for a in list_assets()) or "none"
    raise KeyError(f"no shipped asset named {name!r} (shipped: {known})")


def summary(asset: dict) -> str:
    """One line describing an asset for `dtsweep assets`."""
    card = asset["card"]
    if asset["kind"] == "behaviour":
        detail = f"env {card['env']}"
    else:
        ev = card["evaluation"]
        detail = (
            f"{card['corpus']['name']}; held-out {ev['heldout_loss']:.2f} vs unigram "
            f"{ev['unigram_loss']:.2f} nats/token; {card['architecture']['n_params']:,} params"
        )
    return f"{asset['name']:<12} {asset['kind']:<10} {detail}"
