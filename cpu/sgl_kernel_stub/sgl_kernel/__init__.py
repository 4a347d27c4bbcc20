"""Import-only stand-in for `sgl_kernel` on CPU-only machines.

With SGLANG_USE_CPU_ENGINE=1, SGLang imports a handful of `*_cpu` kernels at module level. On a CPU without
AMX, using torch_native attention and no speculative decoding, none of them is called. Each name here raises
if it ever is, so a path that needs a real kernel fails loudly instead of computing garbage.
"""
__version__ = "0.0.0+tiersched.cpustub"

_IMPORTED_BY_SGLANG = (
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
)


def _not_installed(name):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: this is tiersched's CPU import stub; no real kernel is installed")

    kernel.__name__ = name
    return kernel


for _name in _IMPORTED_BY_SGLANG:
    globals()[_name] = _not_installed(_name)
