from benchmarks.scale_model.layouts import LocalParam, zero1_views
from muon_ds.layout import NOT_SPLIT
from muon_ds.plan import build_plan, TeamOptions
import sys


def show(shapes, world, limit=1.1, fpb=0.0, wire=4):
    params = [LocalParam(n, s, NOT_SPLIT, (), "dense") for n, s in shapes.items()]
    views = zero1_views(params, world)
    plan = build_plan(
        views,
        ns_steps=5,
        imbalance_limit=limit,
        bucket_bytes=2**26,
        wire_bytes=wire,
        teams=TeamOptions(world, (0,) * world, fpb),
    )
    print(world, shapes)
    for m in plan.matrices:
        print(
            "  ",
            m.name,
            m.rows,
            m.cols,
            m.flops,
            "owner",
            m.owner,
            "team",
            m.team and (m.team.members, m.team.cuts, m.team.mode, m.team.member_flops),
            "segs",
            len(m.segments),
        )
    print("   loads", [plan.ns_flops(r) for r in range(world)], "imb", round(plan.imbalance(), 3))


show({"big": (48, 168), "tall": (160, 40), "small": (8, 24)}, 4)
show({"big": (48, 168), "tall": (160, 40), "small": (8, 24)}, 2)
show({"sq": (64, 64), "small": (8, 24)}, 4)
print("=====")
S={"wide": (64, 224), "tall": (160, 40), "square": (56, 56), "small": (8, 24)}
show(S, 2); show(S, 4)
S={"wide": (64, 224), "tall": (192, 48), "square": (40, 40), "small": (8, 24)}
show(S, 2); show(S, 4)
