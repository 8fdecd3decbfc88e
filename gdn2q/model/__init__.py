"""Pure-PyTorch GDN-2 language model: layers, LM and the explicit decode state."""

from gdn2q.model.gdn2 import GDN2Mixer
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.model.state import AttentionLayerState, DecodeState, GDN2LayerState

__all__ = ["AttentionLayerState", "DecodeState", "GDN2ForCausalLM", "GDN2LayerState", "GDN2Mixer"]
