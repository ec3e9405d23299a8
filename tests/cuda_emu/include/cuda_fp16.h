// Emulation stand-in (tests/cuda_emu/emu.h).
#pragma once
#include "../emu.h"
