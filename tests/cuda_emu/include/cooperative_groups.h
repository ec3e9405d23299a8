// Emulation stand-in (tests/cuda_emu/emu.h): the cluster_group of a thread block cluster.
#pragma once
#include "../emu.h"

#define _CG_HAS_CLUSTER_GROUP

namespace cooperative_groups {

struct cluster_group {
  static unsigned block_rank() { return ::emu::state().current->rank; }
  static unsigned num_blocks() { return ::emu::state().cluster_size; }
  static void sync() { ::emu::wait(::emu::state().cluster_barrier); }
  template <typename T>
  static T* map_shared_rank(T* addr, int rank) {
    return ::emu::map_shared(addr, static_cast<unsigned>(rank));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
