"""Test-only stand-in for torchvision (which cannot be installed here).

open_clip is used in the tests as the *reference* implementation; its import needs only a
few names from ``torchvision.transforms`` and ``torchvision.ops.misc``. None of them is
called by the tests (they feed open_clip tensors directly). rsitr itself never imports this.
"""
