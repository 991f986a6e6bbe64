"""Cut selection: profile the networks (profile), describe the fleet (devices), model one
iteration's latency (latency) and choose every client's cuts (search); ``huscf cuts`` (cli)."""

from huscf.cuts.devices import DeviceProfile, ServerProfile, assign_devices, load_profiles
from huscf.cuts.latency import LatencyModel, LatencyReport, evaluate_latency
from huscf.cuts.profile import ArchProfile, NetProfile, profile_architecture, profile_blocks
from huscf.cuts.search import CutPlan, plan_cuts

__all__ = ["ArchProfile", "CutPlan", "DeviceProfile", "LatencyModel", "LatencyReport", "NetProfile",
           "ServerProfile", "assign_devices", "evaluate_latency", "load_profiles", "plan_cuts",
           "profile_architecture", "profile_blocks"]
