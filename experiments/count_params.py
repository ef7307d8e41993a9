r"""Parameter, FLOP and memory accounting of a config, from shapes only (nothing allocated).

  python experiments/count_params.py --config=experiments/configs/booklm_720b.py
  python experiments/count_params.py --config=experiments/configs/deepseek_v3.py \
      --num_devices=256 --mesh=fsdp=32,expert=8 --json_out=/tmp/ds3.json

Prints total parameters, parameters by component, activated parameters per token
(nominal / min / max) and the activated fraction, training FLOPs per token, the
KV cache per token and for one 128K sequence, and per-device parameter + AdamW
memory on the given mesh. Conventions: bookjax/accounting.py.
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=False)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 256, "Devices of the mesh to size memory for.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. 'fsdp=32,expert=8' (unset axes: "
                            "1, data takes the rest); default: the config's `mesh`.")
_FLOPS_SEQ_LEN = flags.DEFINE_integer("flops_seq_len", 4096,
                                      "Training sequence length for the attention FLOPs.")
_KV_SEQ_LEN = flags.DEFINE_integer("kv_seq_len", 131072, "Sequence length for the KV-cache size.")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"],
                                 "dtype of the KV cache.")
_GLYPH_COMPONENTS = flags.DEFINE_integer("glyph_components", 1024,
                                         "Glyph component-table size assumed for counting.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")
_TRACE_ALL = flags.DEFINE_bool("trace_all_blocks", False,
                               "Trace every block instead of one per kind (slower, same result).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  from bookjax import accounting  # pylint: disable=g-import-not-at-top
  name = flags.FLAGS["config"].config_filename
  mesh = accounting.parse_mesh(_MESH.value) if _MESH.value else None
  report = accounting.account(
      _CONFIG.value, name=name, num_devices=_NUM_DEVICES.value, mesh=mesh,
      flops_seq_len=_FLOPS_SEQ_LEN.value, kv_seq_len=_KV_SEQ_LEN.value,
      cache_dtype=_CACHE_DTYPE.value, glyph_components=_GLYPH_COMPONENTS.value,
      dedupe_blocks=not _TRACE_ALL.value)
  print(accounting.format_report(report), flush=True)
  if _JSON_OUT.value:
    accounting.write_json(report, _JSON_OUT.value)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
