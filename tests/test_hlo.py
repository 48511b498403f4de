"""clip_jax/hlo.py: a compiled step's collectives, read from its HLO text."""

from clip_jax.hlo import collective_traffic, runs_per_step


def test_collective_traffic_counts_each_collectives_result_once_per_run():
    module = """HloModule jit_train_step

%layer (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %all-gather.7 = f32[64]{0} all-gather(f32[8]{0} %x), dimensions={0}
  %inner = (s32[]) while((s32[]) %t), condition=%more.2, body=%micro, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t.2 = (s32[], f32[8]) tuple(%i, %x)
}

%micro (p: (s32[])) -> (s32[]) {
  %all-reduce.8 = f32[4]{0} all-reduce(f32[4]{0} %y), to_apply=%sum
  ROOT %t.3 = (s32[]) tuple(%i)
}

ENTRY %main.1 (p0: f32[4,77,64]) -> f32[16,77,64] {
  %all-gather.1 = f32[16,77,64]{2,1,0} all-gather(f32[4,77,64]{2,1,0} %p0), dimensions={0}
  %all-reduce.2 = (f32[256]{0}, bf16[8,8]{1,0}, f32[], f32[], f32[], /*index=5*/f32[2]{0}) all-reduce(%a, %b, %c)
  %all-gather-start.3 = (bf16[1024]{0}, bf16[4096]{0}) all-gather-start(bf16[1024]{0} %p1), dimensions={0}
  %all-gather-done.3 = bf16[4096]{0} all-gather-done((bf16[1024]{0}, bf16[4096]{0}) %all-gather-start.3)
  %reduce-scatter.4 = pred[2048]{0} reduce-scatter(pred[8192]{0} %m), dimensions={0}, to_apply=%or
  %loop = (s32[], f32[8]{0}) while(%init), condition=%more, body=%layer, backend_config={"known_trip_count":{"n":"12"}}
  ROOT %fusion.5 = f32[16,77,64]{2,1,0} fusion(f32[16,77,64]{2,1,0} %all-gather.1), kind=kLoop, calls=%gather_like
}
"""
    assert runs_per_step(module) == {"main.1": 1, "layer": 12, "micro": 36}
    mib, tuple_bytes = 2**20, 256 * 4 + 8 * 8 * 2 + 3 * 4 + 2 * 4
    assert collective_traffic(module) == {
        # the entry's two (one asynchronous: its result counted at -done) and the loop body's, 12 times
        "all-gather": {"ops": 14, "mib": round((16 * 77 * 64 * 4 + 4096 * 2 + 12 * 64 * 4) / mib, 3),
                       "largest_mib": round(16 * 77 * 64 * 4 / mib, 3)},
        # a long tuple's type holds comments with "=" in them; the inner loop runs 3 times per layer
        "all-reduce": {"ops": 37, "mib": round((tuple_bytes + 36 * 4 * 4) / mib, 3),
                       "largest_mib": round(tuple_bytes / mib, 3)},
        "reduce-scatter": {"ops": 1, "mib": round(2048 / mib, 3), "largest_mib": round(2048 / mib, 3)},
    }
