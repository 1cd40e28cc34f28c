"""Offline-only perceptual losses: MONAI's :class:`~monai.losses.PerceptualLoss`, built only from files on disk.

Pretrained perceptual networks are never downloaded here. MONAI fetches them on construction: LPIPS ("alex", "vgg",
"squeeze") and "resnet50" through torchvision's ``load_state_dict_from_url`` into ``<torch hub dir>/checkpoints``,
the RadImageNet and MedicalNet networks with ``torch.hub.load("Project-MONAI/perceptual-models:main")`` (a GitHub
archive, whose fork check calls the GitHub API without a timeout) followed by ``hf_hub_download`` from the Hugging
Face Hub. :func:`build_perceptual_loss` therefore only builds the perceptual loss when everything it needs is already on
disk (see :func:`perceptual_weights_status`; the torch hub dir is ``$TORCH_HOME/hub``, by default
``~/.cache/torch/hub``). Otherwise it warns once and trains without the term.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings

import torch
from monai.losses import PerceptualLoss
from monai.losses.perceptual import PerceptualNetworkType

__all__ = ["build_perceptual_loss", "perceptual_weights_status"]

# torchvision checkpoints MONAI's perceptual networks load (LPIPS backbones and torchvision's ResNet50 DEFAULT).
_TORCHVISION_CHECKPOINTS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
}
# Weight files of the torch.hub repository Project-MONAI/perceptual-models.
_HUB_REPO_DIR = "Project-MONAI_perceptual-models_main"
_HUB_WEIGHTS = {
    "radimagenet_resnet50": "RadImageNet-ResNet50_notop.pth",
    "medicalnet_resnet10_23datasets": "medicalnet_resnet_10_23dataset.pth",
    "medicalnet_resnet50_23datasets": "medicalnet_resnet50_23datasets.pth",
}


def perceptual_weights_status(network_type: str) -> str | None:
    """Whether MONAI's ``PerceptualLoss(network_type=...)`` can be built from local files only.

    Looks in ``torch.hub.get_dir()`` for exactly the files MONAI (or the libraries it calls) would otherwise
    download, without touching the network. MedicalNet weights are fetched with ``hf_hub_download``, which contacts
    the Hub even when the file is cached, so they additionally need ``HF_HUB_OFFLINE=1``.

    Args:
        network_type: a :class:`monai.losses.perceptual.PerceptualNetworkType` value, e.g. ``"alex"``.

    Returns:
        ``None`` when everything needed is on disk, else a one-line reason why not.

    Raises:
        ValueError: for an unknown ``network_type``.
    """
    network_type = network_type.lower()
    if network_type not in list(PerceptualNetworkType):
        raise ValueError(f"unknown perceptual network {network_type!r}; one of {', '.join(PerceptualNetworkType)}")
    hub_dir = torch.hub.get_dir()
    if network_type in _TORCHVISION_CHECKPOINTS:
        packages = ["torchvision"] if network_type == "resnet50" else ["lpips", "torchvision"]
        missing = [name for name in packages if importlib.util.find_spec(name) is None]
        if missing:
            return f"package(s) {', '.join(missing)} not installed"
        checkpoint = os.path.join(hub_dir, "checkpoints", _TORCHVISION_CHECKPOINTS[network_type])
        return None if os.path.isfile(checkpoint) else f"{checkpoint} not found"
    repo_dir = os.path.join(hub_dir, _HUB_REPO_DIR)
    if not os.path.isdir(repo_dir):
        return f"torch.hub repository cache {repo_dir} not found"
    filename = _HUB_WEIGHTS[network_type]
    if network_type == "radimagenet_resnet50":
        weights = os.path.join(hub_dir, filename)
        return None if os.path.isfile(weights) else f"{weights} not found"
    # MedicalNet: hf_hub_download(repo_id="MONAI/checkpoints", cache_dir=<hub dir>) layout.
    from huggingface_hub import constants

    pattern = os.path.join(hub_dir, "models--MONAI--checkpoints", "snapshots", "*", filename)
    if not glob.glob(pattern):
        return f"no cached {pattern}"
    if not constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is not set (hf_hub_download would contact the Hugging Face Hub)"
    return None


def build_perceptual_loss(spatial_dims: int, network: str, fake_3d_ratio: float = 0.2) -> PerceptualLoss | None:
    """MONAI's ``PerceptualLoss`` built from local files only (frozen, eval mode), or ``None`` after one warning
    that says why (weights not on disk, packages missing, or construction failed)."""
    medicalnet = network.startswith("medicalnet_")
    if medicalnet and spatial_dims != 3:
        raise ValueError(f"perceptual network {network!r} needs spatial_dims=3")
    reason = perceptual_weights_status(network)
    if reason is None:
        try:
            loss = PerceptualLoss(
                spatial_dims=spatial_dims,
                network_type=network,
                is_fake_3d=spatial_dims == 3 and not medicalnet,
                fake_3d_ratio=fake_3d_ratio,
                channel_wise=False,
            )
        except Exception as exc:  # a corrupt cache, a version mismatch, ...: train without the term
            reason = f"building it failed with {type(exc).__name__}: {exc}"
        else:
            loss.requires_grad_(False)
            return loss.eval()
    warnings.warn(
        f"perceptual loss disabled: pretrained weights for {network!r} are not available offline ({reason}); "
        "training without it",
        UserWarning,
        stacklevel=4,
    )
    return None
