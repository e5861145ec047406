// How many threads a model call may use now: the cores this process may run on, less those that other
// processes keep busy at this moment, at least one (serving/threads.py is the same rule in Python).
//
// LibTorch's default, one OpenMP thread per core busy-waiting at every barrier, collapses when other work
// holds the cores: a parallel region waits for a thread the scheduler has not run. 40 queries at 96 px on
// 2 cores (benchmarks/contention.py): idle 1.4 s; beside two spinning processes 3.4-29.6 s (x2.5-x21
// between runs), beside a PyTorch process 3.1-16.4 s; with one thread 2.0-3.0 s in both. The busy cores
// are read per query from /proc/loadavg's runnable count, less this process's own runnable threads.
#include <dirent.h>
#include <sched.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

#include "svf_fss/threads.h"

namespace svf_fss {
namespace {

int allowed_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// Runnable tasks of the whole machine ("R/T" in /proc/loadavg), -1 when unreadable.
int runnable_tasks() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c, rt;
  if (!(f >> a >> b >> c >> rt)) return -1;
  try {
    return std::stoi(rt.substr(0, rt.find('/')));
  } catch (const std::exception&) {
    return -1;
  }
}

// This process's threads that are running or runnable (state R in /proc/self/task/*/stat).
int own_runnable() {
  int n = 0;
  DIR* d = opendir("/proc/self/task");
  if (!d) return 1;
  while (auto* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(std::string("/proc/self/task/") + e->d_name + "/stat");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto close = s.rfind(')');
    if (close != std::string::npos && close + 2 < s.size() && s[close + 2] == 'R') ++n;
  }
  closedir(d);
  return std::max(n, 1);
}

}  // namespace

int fair_threads() {
  int cores = allowed_cores(), runnable = runnable_tasks();
  if (runnable < 0) return cores;
  int others = std::max(0, runnable - own_runnable());
  return std::clamp(cores - others, 1, cores);
}

}  // namespace svf_fss
