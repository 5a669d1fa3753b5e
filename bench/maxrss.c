/*
 * Runs a command and prints, as one JSON line on stderr, its wall time and its peak RSS: wait4's
 * ru_maxrss, the largest of the command's own and of the children it reaped (tar's gzip, our
 * client's skopeo). bench/extract.ts runs every side of its comparison through it, so all are timed
 * the same way, from fork to reaping.
 *
 *   maxrss COMMAND [ARG...]
 */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: maxrss COMMAND [ARG...]\n");
    return 2;
  }
  struct timespec start, end;
  clock_gettime(CLOCK_MONOTONIC, &start);
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return 1;
  }
  if (pid == 0) {
    execvp(argv[1], argv + 1);
    perror("execvp");
    _exit(127);
  }
  int status;
  struct rusage usage;
  if (wait4(pid, &status, 0, &usage) < 0) {
    perror("wait4");
    return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &end);
  double ms = (end.tv_sec - start.tv_sec) * 1e3 + (end.tv_nsec - start.tv_nsec) / 1e6;
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  fprintf(stderr, "{\"ms\":%.3f,\"maxrssKiB\":%ld,\"status\":%d}\n", ms, usage.ru_maxrss, code);
  return 0;
}
