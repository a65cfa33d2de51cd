"""Weight loading and conversion without torch: names, layouts, bad files, the converter CLI,
and the batched/sharded encode path (chunking and device count do not change results)."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import tolerances as T
from conftest import load_config
from pso_jax.errors import UserError
from pso_jax.models import sd_vae, torchvision_nets
from pso_jax.tools import convert, random_weights

TINY_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 4,
            "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}


def write_vae_folder(folder, seed=0, rename=None, latent_channels=4) -> dict:
  """A 2-block random VAE (16 px -> 8x8x4) in diffusers format; `rename` edits its state dict."""
  state = random_weights.write_vae_folder(folder, (8, 16), 4, latent_channels, seed=seed)
  if rename:
    state = rename(state)
    save_file(state, os.path.join(folder, sd_vae.WEIGHTS_FILE))
  return state


def random_state_dict(arch, num_classes, seed):
  template = torchvision_nets.abstract_variables(torchvision_nets.ARCHS[arch](num_classes=num_classes))
  return random_weights.random_state_dict(template, seed)


def resnet_state(seed=0, num_classes=0):
  return random_state_dict("resnet50", num_classes, seed)


def test_torch_names_and_layouts_map_exactly(tmp_path):
  """A state dict written from known Flax arrays loads back to those arrays (OIHW->HWIO, [out,in]
  -> [in,out], BN stats in batch_stats); `num_batches_tracked` is ignored."""
  state = resnet_state(num_classes=5)
  assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["fc.weight"].shape == (5, 2048)
  assert "layer1.0.downsample.1.running_mean" in state and "layer4.2.bn3.weight" in state
  state["bn1.num_batches_tracked"] = np.array(7, np.int64)
  path = str(tmp_path / "r50.safetensors")
  save_file(state, path)
  model, v = torchvision_nets.load("resnet50", path)
  assert model.num_classes == 5
  np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_1"]["scale"],
                                state["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["layer3_5"]["bn2"]["var"], state["layer3.5.bn2.running_var"])
  # half-precision files (e.g. `*.fp16.safetensors` downloads) are widened to float32
  save_file({k: a.astype(np.float16) for k, a in state.items()}, path)
  _, half = torchvision_nets.load("resnet50", path)
  assert half["params"]["conv1"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(half["params"]["layer1_0"]["conv2"]["kernel"],
                                v["params"]["layer1_0"]["conv2"]["kernel"].astype(np.float16).astype(np.float32))
  save_file(state, path)
  # DataParallel / SwAV wrappers: `module.` prefix and projection head are handled
  wrapped = {"module." + k: a for k, a in state.items() if not k.startswith("fc.")}
  wrapped["module.projection_head.0.weight"] = np.zeros((8, 2048), np.float32)
  wrapped["module.prototypes.weight"] = np.zeros((3, 8), np.float32)
  save_file(wrapped, path)
  model, v2 = torchvision_nets.load("resnet50", path)
  assert model.num_classes == 0
  np.testing.assert_array_equal(v2["params"]["layer4_2"]["conv3"]["kernel"], v["params"]["layer4_2"]["conv3"]["kernel"])


def test_old_densenet_names_and_chexnet_wrapper(tmp_path):
  """Old torchvision files (`denselayer1.norm.1.weight`) and CheXNet's `module.densenet121.` +
  `classifier.0` load to the same variables as the current names."""
  state = random_state_dict("densenet121", 8, 1)
  save_file(state, str(tmp_path / "new.safetensors"))
  old = {}
  for k, a in state.items():
    k = k.replace("classifier.", "classifier.0.")
    for n in ("norm", "relu", "conv"):
      for i in ("1", "2"):
        k = k.replace(f".{n}{i}.", f".{n}.{i}.") if "denselayer" in k else k
    old["module.densenet121." + k] = a
  assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in old
  save_file(old, str(tmp_path / "old.safetensors"))
  _, a = torchvision_nets.load("densenet121", str(tmp_path / "new.safetensors"))
  _, b = torchvision_nets.load("densenet121", str(tmp_path / "old.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _bad(path, arch="resnet50", **kw):
  with pytest.raises(UserError) as e:
    torchvision_nets.load(arch, path, **kw)
  return str(e.value)


def test_bad_weight_files_name_the_problem(tmp_path):
  good = resnet_state()
  path = str(tmp_path / "w.safetensors")

  def write(state):
    save_file(state, path)
    return path

  missing = dict(good)
  del missing["layer1.0.conv2.weight"]
  assert "lacks 1 tensor" in _bad(write(missing)) and "layer1.0.conv2.weight" in _bad(path)
  extra = dict(good, **{"layer5.0.conv1.weight": np.zeros((4, 4, 1, 1), np.float32)})
  assert "layer5.0.conv1.weight" in _bad(write(extra)) and "does not use" in _bad(path)
  shaped = dict(good, **{"layer2.1.conv2.weight": np.zeros((128, 128, 1, 1), np.float32)})
  msg = _bad(write(shaped))
  assert "layer2.1.conv2.weight" in msg and "(128, 128, 1, 1)" in msg and "(128, 128, 3, 3)" in msg
  typed = dict(good, **{"bn1.weight": np.ones(64, np.int32)})
  assert "bn1.weight" in _bad(write(typed)) and "dtype int32" in _bad(path)
  # the DenseNet-121 file given as ResNet-50
  dense = random_state_dict("densenet121", 0, 2)
  assert "does not hold resnet50 weights" in _bad(write(dense))
  # truncated download
  save_file(good, path)
  with open(path, "rb") as f:
    blob = f.read()
  for cut in (len(blob) // 2, 5, 8 + 100):
    with open(path, "wb") as f:
      f.write(blob[:cut])
    msg = _bad(path)
    assert "truncated" in msg or "not a safetensors file" in msg, msg
  assert "does not exist" in _bad(str(tmp_path / "nope.pth"))
  assert "head" in _bad(write(resnet_state(num_classes=3)), num_classes=7)


def test_vae_folder_loads_legacy_attention_names(tmp_path):
  state = write_vae_folder(str(tmp_path / "new"))
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def rename(s):
    out = {}
    for k, a in s.items():
      for new, old in legacy.items():
        if f"attentions.0.{new}." in k:
          k = k.replace(f".{new}.", f".{old}.")
          a = a[:, :, None, None] if a.ndim == 2 else a  # stored as 1x1 convs
      out[k] = a
    return out

  old = write_vae_folder(str(tmp_path / "old"), rename=rename)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
  assert old["encoder.mid_block.attentions.0.query.weight"].ndim == 4
  _, a = sd_vae.load_vae(str(tmp_path / "new"))
  _, b = sd_vae.load_vae(str(tmp_path / "old"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(a["params"]["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                state["encoder.mid_block.attentions.0.to_q.weight"].T)


def test_vae_bad_inputs(tmp_path):
  from pso_jax.data import vae_latents
  config = load_config("")
  config.data.image_size = 16
  images = np.zeros((2, 16, 16, 3), np.uint8)
  write_vae_folder(str(tmp_path / "eight"), latent_channels=8)
  for folder, cfg in [("vq", dict(TINY_VAE, _class_name="VQModel")),
                      ("up", dict(TINY_VAE, up_block_types=["AttnUpDecoderBlock2D"] * 2))]:
    os.makedirs(tmp_path / folder)
    (tmp_path / folder / "config.json").write_text(json.dumps(cfg))
  for folder, match in [("eight", "latent_channels=8 but config.data.latent.mean/std have 4"),
                        ("vq", "not an AutoencoderKL"), ("up", "up_block_types")]:
    config.data.latent.vae_dir = str(tmp_path / folder)
    with pytest.raises(UserError, match=match):
      vae_latents.encode_images(config, images)
  write_vae_folder(str(tmp_path / "ok"))
  config.data.latent.vae_dir = str(tmp_path / "ok" / sd_vae.WEIGHTS_FILE)
  with pytest.raises(UserError, match="bare weight file"):
    vae_latents.encode_images(config, images)
  os.remove(tmp_path / "ok" / sd_vae.WEIGHTS_FILE)
  config.data.latent.vae_dir = str(tmp_path / "ok")
  with pytest.raises(UserError, match="no diffusion_pytorch_model.safetensors"):
    vae_latents.encode_images(config, images)
  config.data.latent.vae_dir = ""
  with pytest.raises(UserError, match="vae_dir is empty"):
    vae_latents.encode_images(config, images)


def test_converter_round_trip_and_errors(tmp_path, capsys):
  write_vae_folder(str(tmp_path / "vae"))
  dst = str(tmp_path / "vae_flax.safetensors")
  assert convert.main(["vae", str(tmp_path / "vae"), dst]) == 0
  assert "sd_vae" in capsys.readouterr().out
  model_a, a = sd_vae.load_vae(str(tmp_path / "vae"))
  model_b, b = sd_vae.load_vae(dst)
  assert model_a.config == model_b.config
  jax.tree.map(np.testing.assert_array_equal, a, b)
  save_file(resnet_state(num_classes=4), str(tmp_path / "r.safetensors"))
  assert convert.main(["resnet50", str(tmp_path / "r.safetensors"), str(tmp_path / "r_flax.safetensors"),
                       "--features_only"]) == 0
  model, v = torchvision_nets.load("resnet50", str(tmp_path / "r_flax.safetensors"))
  assert model.num_classes == 0 and "fc" not in v["params"]
  # a converted file for another network, and a bad source, are one-line errors
  assert "converted for 'resnet50'" in _bad(str(tmp_path / "r_flax.safetensors"), arch="densenet121")
  assert convert.main(["densenet121", str(tmp_path / "r.safetensors"), str(tmp_path / "d.safetensors")]) == 2
  assert "does not hold densenet121 weights" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "d.safetensors")


def test_encode_is_independent_of_chunking_and_devices(tmp_path):
  """Posterior noise per dataset position: chunked encoding == one call; the 8-device sharded
  batched path == a plain 1-device apply with the same per-image keys; decode inverts the map."""
  from pso_jax.data import vae_latents
  write_vae_folder(str(tmp_path / "vae"))
  config = load_config("")
  config.data.image_size = 16
  config.data.latent.vae_dir = str(tmp_path / "vae")
  config.data.latent.batch_size = 3   # rounded up to the 8 devices, last batch padded
  config.data.latent.mean = (0.5, -0.5, 1.0, 0.0)
  config.data.latent.std = (2.0, 1.0, 0.5, 4.0)
  images = np.random.default_rng(0).integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
  whole = vae_latents.encode_images(config, images)
  parts = np.concatenate([vae_latents.encode_images(config, images[:4]),
                          vae_latents.encode_images(config, images[4:], start_index=4)])
  vae_rtol = T.network_rtol(sd_vae.load_vae(config.data.latent.vae_dir)[1])  # other batches
  T.assert_close(parts, whole, vae_rtol)
  assert whole.shape == (11, 8, 8, 4)
  # 1-device reference: same keys, plain apply, the affine map written out
  model, v = sd_vae.load_vae(config.data.latent.vae_dir)
  base = jax.random.fold_in(jax.random.key(config.seed), vae_latents._NOISE_TAG)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(11))
  with jax.default_device(jax.devices()[0]):
    mean, logvar = model.apply(v, images / np.float32(255), method=model.encode)
    raw = np.asarray(sd_vae.sample_posterior(mean, logvar, keys))
  ref = (raw - np.float32(config.data.latent.mean)) * (0.5 / np.float32(config.data.latent.std))
  T.assert_close(whole, ref, vae_rtol)
  assert not np.allclose(raw, np.asarray(mean), atol=1e-3)  # a sample, not the mean
  # decode: inverse affine map, clamp [0,1], x255 truncated
  dec = np.asarray(model.apply(v, raw, method=model.decode))
  out = vae_latents.decode_latents(config, whole)
  assert out.dtype == np.uint8 and out.shape == (11, 16, 16, 3)
  expect = np.floor(np.clip(dec, 0, 1) * 255)
  assert np.mean(out != expect) < 0.01 and np.max(np.abs(out - expect)) <= 1
