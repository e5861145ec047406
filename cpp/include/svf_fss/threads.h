// svf-fss in C++: the threads a model call may use (cpp/src/threads.cpp); no LibTorch header.
#pragma once

namespace svf_fss {

// The threads a model call may use now: the cores this process may run on less those other processes keep
// busy (cpp/src/threads.cpp), at least 1. LibTorch's default (every core) collapses on a busy machine.
int fair_threads();

}  // namespace svf_fss
