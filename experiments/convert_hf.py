r"""Hugging Face DeepSeek-V3 checkpoints <-> bookjax.

Import (HF directory with config.json + safetensors -> bookjax config.json + params/):
  python experiments/convert_hf.py --mode=import --hf_dir=/ckpt/DeepSeek-V3 --out=/ckpt/ds3_bookjax
Export (a convert_hf import dir, or a training workdir's latest checkpoint -> HF dir):
  python experiments/convert_hf.py --mode=export --bookjax_dir=workdirs/ds3 --out=/ckpt/ds3_hf \
      --expert_layout=per_expert --dtype=bfloat16
`--verify` (import, small checkpoints, needs the `hf` extra) compares logits with
transformers on random tokens. Mapping and refusals: bookjax/hf_interop.py.
"""
from absl import app, flags

_MODE = flags.DEFINE_enum("mode", None, ["import", "export"], "Direction.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (import source).")
_BOOKJAX_DIR = flags.DEFINE_string("bookjax_dir", None,
                                   "bookjax directory (export source): a convert_hf import "
                                   "or a training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Weight dtype (import default float32; export default: as stored).")
_EXPERT_LAYOUT = flags.DEFINE_enum("expert_layout", "per_expert", ["per_expert", "fused"],
                                   "Export: routed-expert tensor layout.")
_STEP = flags.DEFINE_integer("step", None, "Export from a training workdir: this step.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Export: max safetensors shard size (GiB).")
_VERIFY = flags.DEFINE_bool("verify", False, "Import: compare logits with transformers.")
flags.mark_flags_as_required(["mode", "out"])


def main(argv):
  del argv
  from bookjax import hf_interop  # pylint: disable=g-import-not-at-top
  if _MODE.value == "import":
    if not _HF_DIR.value:
      raise app.UsageError("--mode=import needs --hf_dir")
    imp = hf_interop.import_checkpoint(_HF_DIR.value, dtype=_DTYPE.value or "float32")
    hf_interop.save_bookjax(_OUT.value, imp.config, imp.params, imp.router_bias)
    for note in imp.notes:
      print("note:", note)
    print(f"imported {_HF_DIR.value} -> {_OUT.value}")
    if _VERIFY.value:
      diff = hf_interop.compare_with_transformers(_HF_DIR.value, imp)
      print(f"max |logit difference| vs transformers: {diff:.3e}")
  else:
    if not _BOOKJAX_DIR.value:
      raise app.UsageError("--mode=export needs --bookjax_dir")
    config, params, router_bias = hf_interop.load_bookjax(_BOOKJAX_DIR.value, _STEP.value)
    files = hf_interop.export_checkpoint(
        config, params, router_bias, _OUT.value, expert_layout=_EXPERT_LAYOUT.value,
        dtype=_DTYPE.value, max_shard_bytes=int(_SHARD_GB.value * 2 ** 30))
    print(f"exported {_BOOKJAX_DIR.value} -> {_OUT.value}: {len(files)} files")


if __name__ == "__main__":
  app.run(main)
