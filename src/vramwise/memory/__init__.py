"""GPU-memory budget accounting, the placement planner and its cost model (torch-free), and the doctor's
measurements (memory/bandwidth.py, which imports torch only inside its functions).

    from vramwise.memory import plan, H100
    p = plan(model_config, 6 << 30, H100, QuantSpec.int4())
    print(p.summary()); p.to_dict()  # what the offload driver executes
"""

from vramwise.memory.budget import (
    Budget,
    BudgetTooSmallError,
    ModelWeights,
    QuantScheme,
    WeightFormat,
    kv_bytes_per_token,
    model_weights,
    resolve_quant,
)
from vramwise.memory.costmodel import CPU_GENERIC, H100, RTX2060, DeviceProfile, builtin_profile, profile_from_doctor
from vramwise.memory.planner import CPU, POLICIES, RESIDENT, STREAMED, Alternative, Plan, Prediction, plan, plan_matrix

__all__ = [
    "Alternative", "Budget", "BudgetTooSmallError", "CPU", "CPU_GENERIC", "DeviceProfile", "H100", "ModelWeights",
    "POLICIES", "Plan", "Prediction", "QuantScheme", "RESIDENT", "RTX2060", "STREAMED", "WeightFormat",
    "builtin_profile", "kv_bytes_per_token", "model_weights", "plan", "plan_matrix", "profile_from_doctor",
    "resolve_quant",
]
