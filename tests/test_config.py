import pytest

from quantnoise import QuantNoiseConfig


@pytest.mark.parametrize("field,value", [
    ("scheme", "int3"), ("p", -0.1), ("p", 1.5), ("block_size", 0), ("bits", 1), ("bits", 9),
    ("granularity", "row"), ("observer", "histogram"), ("n_centroids", 1), ("refresh_every", 0),
    ("include", "fc[1"), ("ema_momentum", 0.0),
])
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        QuantNoiseConfig(**{field: value})
    assert f"{field}={value!r}" in str(e.value)


def test_drop_rejects_p_one_but_scalar_and_pq_accept_it():
    with pytest.raises(ValueError, match="p=1"):
        QuantNoiseConfig(scheme="drop", p=1.0)
    assert QuantNoiseConfig(scheme="scalar", p=1.0).p == 1.0
    assert QuantNoiseConfig(scheme="pq", p=1.0).p == 1.0


def test_eval_quantized_needs_a_quantizing_scheme():
    with pytest.raises(ValueError, match="eval_quantized"):
        QuantNoiseConfig(scheme="drop", eval_quantized=True)


def test_grid_bounds():
    assert (QuantNoiseConfig(bits=8).qmin, QuantNoiseConfig(bits=8).qmax) == (-127, 127)
    asym = QuantNoiseConfig(bits=4, symmetric=False)
    assert (asym.qmin, asym.qmax) == (0, 15)


def test_is_a_hydra_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(QuantNoiseConfig)
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["scheme=scalar", "bits=4"]))
    assert QuantNoiseConfig(**OmegaConf.to_container(merged)).bits == 4


# every field's type is checked (bool is an int subclass in Python, but True is not a block size)
@pytest.mark.parametrize("field,value", [
    ("scheme", 1), ("scheme", None), ("p", "0.1"), ("p", True), ("p", float("nan")), ("block_size", True),
    ("block_size", 8.0), ("block_size", "8"), ("bits", False), ("bits", 4.0), ("symmetric", "no"), ("symmetric", 1),
    ("granularity", ["channel"]), ("group_size", True), ("group_size", 64.5), ("observer", 0),
    ("ema_momentum", "0.1"), ("ema_momentum", True), ("ema_momentum", float("nan")), ("n_centroids", True),
    ("n_centroids", 16.0), ("kmeans_iters", "20"), ("refresh_every", 1.5), ("include", 123), ("exclude", ["fc"]),
    ("seed", "0"), ("seed", 1.5), ("seed", True), ("eval_quantized", "yes"), ("eval_quantized", 1),
])
def test_wrong_type_is_one_line_value_error_naming_field_and_value(field, value):
    kw = {"scheme": "scalar"} if field == "eval_quantized" else {}
    with pytest.raises(ValueError) as e:
        QuantNoiseConfig(**{**kw, field: value})
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and len(msg.splitlines()) == 1, msg


def test_numbers_of_any_integral_or_real_type_are_accepted():
    import numpy as np

    cfg = QuantNoiseConfig(p=np.float32(0.25), block_size=np.int64(4), ema_momentum=1, seed=np.int32(3))
    assert (cfg.p, cfg.block_size, cfg.seed) == (0.25, 4, 3) and type(cfg.p) is float and type(cfg.block_size) is int
