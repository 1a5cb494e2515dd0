def export_param(module, name):
    """A parameter in transformers' layout (nn.Linear weights transposed back to (C_out, C_in))."""
    from ..nn import Linear
    a = module.params[name]
    return a.T.copy() if isinstance(module, Linear) and module.torch_layout and name == "weight" else a.copy()
