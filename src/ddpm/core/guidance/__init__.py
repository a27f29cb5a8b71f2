"""Guidance at sampling time, and the label dropout classifier-free guidance needs at training (Ho & Salimans 2022).

A guidance method is a class of its own module here (``cfg.py``, ``apg.py``, ``cfgpp.py``, ``autoguidance.py``): its
fields are its settings (the keys under ``guidance.<name>`` in conf/guidance/cfg.yaml), checked as it is made, and it
combines the conditional prediction with a second one, the unconditional (cfg, apg, cfgpp) or a weaker model's
(autoguidance). ``Guidance`` holds what every method shares: the scale w, rescaled CFG (Lin et al. 2024, sec. 3.4) and
the guidance interval (Kynkaanniemi et al. 2024), and makes the model function every sampler calls. A new method is one
module here and its settings in conf/guidance/cfg.yaml: the package imports its modules, each class registers itself.

Convention: ``guidance.scale`` is the paper's w,
    x0_guided = (1 + w) * x0(x_t, y) - w * x0(x_t, null)     (and the same for eps),
so w = 0 is the purely conditional model, for cfg, apg and autoguidance. HuggingFace diffusers writes the same rule
as eps_u + s * (eps_c - eps_u) with s = 1 + w: our w = 2 is their guidance_scale = 3. Guiding x_0 or eps is the same
thing (at a fixed x_t they are affine in each other, with weights that sum to 1), so it does not depend on what the
network predicts. CFG++'s scale is its own lambda in [0, 1] (Chung et al. 2024), continuous, so lambda = 0 is the
unconditional model (and no lambda is the conditional one: that renoises with eps_c).

APG, as here and in the paper's code, adds w times its update to the conditional x_0: x0_c + w * update. diffusers'
``AdaptiveProjectedGuidance`` applies it to the pipeline's raw prediction (eps, or the flow velocity) as
pred_c + (s - 1) * update with s its guidance_scale: the same rule with s = 1 + w on a different parameterisation, so
their numbers match ours for an x0-predicting model only.
"""

from __future__ import annotations

from ddpm.core.guidance.common import (METHODS, Guidance, GuidanceMethod, check_guidance, check_sampler_for,  # noqa: F401
                                       drop_labels, guidance_usable, guided, method_of, rescale_guidance)

METHODS.load(__name__)  # every method module here registers its class
GUIDANCE_METHODS = tuple(METHODS)
from ddpm.core.guidance.apg import APG, apg_update  # noqa: E402,F401  (APG(momentum=...): how scripts set its settings)
from ddpm.core.guidance.autoguidance import check_guide  # noqa: E402,F401
