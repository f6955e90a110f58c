"""The whole-scan Prediction: one canonical probability map, masks at any threshold on the source grid."""

from __future__ import annotations

import numpy as np
import pytest

from femur_core import read_volume
from femur_core.inference import Prediction, load_model, postprocess, predict_volume
from femur_core.volume import Volume, from_canonical, to_canonical


def _permuted_flipped_affine():
    """Array axes: 0 -> patient left (x), 1 -> anterior flipped to posterior, 2 -> superior."""
    a = np.zeros((4, 4))
    a[0, 0] = -0.9  # axis 0 walks towards the patient's left (RAS x decreasing)
    a[1, 1] = -1.2  # axis 1 walks posterior
    a[2, 2] = 2.0  # axis 2 walks superior
    a[:3, 3] = (10.0, -4.0, 7.0)
    a[3, 3] = 1
    return a


def test_mask_at_keeps_one_femur_per_side_for_any_orientation():
    """Both femurs survive the cleanup when the left-right axis is array axis 0 (not axis 2)."""
    shape = (40, 20, 16)
    image = np.full(shape, 5.0, np.float32)
    image[2:38] = 100.0
    prob = np.zeros(shape, np.float32)
    prob[5:13, 6:14, 4:10] = 0.9
    prob[28:34, 6:13, 4:10] = 0.8
    prob[19:21, 17:19, 14:16] = 0.95
    affine = _permuted_flipped_affine()
    pred = Prediction.from_probability(Volume(prob, affine, "p.nii.gz"), Volume(image, affine), threshold=0.5)
    mask = pred.mask_at(0.5, cleanup=True)
    assert mask.shape == shape and np.allclose(mask.affine, affine) and mask.source == "p.nii.gz"
    np.testing.assert_array_equal(mask.data.astype(bool), (prob >= 0.5) & (prob < 0.95))
    np.testing.assert_array_equal(pred.mask_at(0.5, cleanup=False).data.astype(bool), prob >= 0.5)
    np.testing.assert_array_equal(pred.prob.data, prob)
    with pytest.raises(ValueError, match="not on the grid"):
        Prediction.from_probability(Volume(prob, affine), Volume(image, np.eye(4)))


def test_predict_volume_masks_match_the_canonical_pipeline(tiny_checkpoint, tiny_scan_pair):
    """``mask`` is ``mask_at(threshold)``; other thresholds equal threshold + cleanup in canonical layout."""
    image = read_volume(tiny_scan_pair[0])
    model = load_model(tiny_checkpoint)
    pred = predict_volume(model, image, device="cpu", precision="fp32", flip_tta=False)
    assert pred.prob.shape == image.shape and np.allclose(pred.prob.affine, image.affine)
    assert pred.source == image.source == pred.mask.source
    np.testing.assert_array_equal(pred.mask.data, pred.mask_at(pred.threshold).data)
    canon_prob = to_canonical(pred.prob)[0].data
    canon_img = to_canonical(image.with_data(image.data.astype(np.float32)))[0].data
    for t in np.quantile(canon_prob, [0.3, 0.7, 0.95]):
        expected = from_canonical(postprocess(canon_prob, float(t), True, canon_img), pred.reorientation).data
        np.testing.assert_array_equal(pred.mask_at(float(t)).data, expected)
        again = Prediction.from_probability(pred.prob, image, threshold=float(t))
        np.testing.assert_array_equal(again.mask.data, expected)


def test_inference_defaults_stored_with_the_model_apply_unless_overridden(tmp_path, tiny_scan_pair, monkeypatch):
    """TrainConfig.flip_tta / cleanup saved in the checkpoint are what load_model + predict_volume use."""
    import femur_core.inference as inference
    from femur_core.checkpoint import save_checkpoint
    from femur_core.models import build_model, default_config
    from femur_core.preprocess import GridSpec
    from femur_core.training import TrainConfig

    cfg = TrainConfig(model=default_config("2d-same", features=4, levels=2), grid=GridSpec(), flip_tta=False,
                      cleanup=False)
    path = tmp_path / "best.pt"
    save_checkpoint(path, build_model(cfg.model), cfg.to_dict(), threshold=0.5)
    model = load_model(path)
    assert (model.flip_tta, model.cleanup) == (False, False)
    seen = []
    real = inference.predict_array

    def spy(net, mc, x, **kw):  # the network's inputs: the scan, and with flip averaging its mirror
        seen.append(x)
        return real(net, mc, x, **kw)

    monkeypatch.setattr(inference, "predict_array", spy)
    image = read_volume(tiny_scan_pair[0])
    pred = predict_volume(model, image, device="cpu", precision="fp32")
    assert len(seen) == 1 and pred.cleanup is False
    seen.clear()
    pred = predict_volume(model, image, device="cpu", precision="fp32", flip_tta=True, cleanup=True)
    assert len(seen) == 2 and np.array_equal(seen[1], seen[0][:, :, ::-1]) and pred.cleanup is True


def test_progress_stages_are_typed():
    from femur_core.progress import ProgressEvent, Stage

    ev = ProgressEvent("epoch_end", epoch=1)
    assert ev.stage is Stage.EPOCH_END and ev.stage == "epoch_end" and str(ev.stage) == "epoch_end"
    with pytest.raises(ValueError, match="not a valid Stage"):
        ProgressEvent("trian")


def test_predict_array_leaves_the_callers_module_as_it_was():
    """Prediction borrows the network: mode, device and memory layout of its tensors stay the caller's."""
    import torch

    from femur_core.inference import predict_array
    from femur_core.models import build_model, default_config

    cfg = default_config("2d-same", features=4, levels=2)
    net = build_model(cfg).to(memory_format=torch.channels_last).train()
    weights = {n: (p.data_ptr(), p.is_contiguous(memory_format=torch.channels_last))
               for n, p in net.named_parameters() if p.ndim == 4}
    buffers = {n: b.data_ptr() for n, b in net.named_buffers()}
    prob = predict_array(net, cfg, np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32),
                         device="cpu", amp=None, flip_tta=True)
    assert prob.shape == (3, 16, 16) and np.isfinite(prob).all()
    assert net.training, "the caller's training mode was changed"
    assert {n: (p.data_ptr(), p.is_contiguous(memory_format=torch.channels_last))
            for n, p in net.named_parameters() if p.ndim == 4} == weights
    assert {n: b.data_ptr() for n, b in net.named_buffers()} == buffers
