// The CPU engine for the baseline instruction set (flags set in CMakeLists.txt).
#define TE_ISA_NS isa_baseline
#include "engine_impl.h"
