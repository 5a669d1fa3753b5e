/*
 * The native baseline for bench/run.ts: the least a client of `skopeo experimental-image-proxy` can do.
 * One SOCK_SEQPACKET socketpair, fork/exec of the same command prefix the library uses, blocking
 * recvmsg()/read() into large buffers, no threads. Prints one JSON line.
 *
 *   baseline MODE REF DIGEST SIZE COUNT PIPESIZE -- COMMAND...
 *
 * MODE: spawn    fork to Initialize reply (ms)
 *       rtt      COUNT x CloseImage on an image id that does not exist (fails fast after the full
 *                request path: receive, decode, dispatch, lock, encode, send); median and mean in us
 *       getblob  GetBlob DIGEST SIZE, read() until SIZE bytes, then FinishPipe (its reply is the
 *                server's digest verdict)
 *       rawblob  GetRawBlob DIGEST (0.2.8): data fd to EOF, then the error fd
 * PIPESIZE: grow received blob pipes with F_SETPIPE_SZ when > 0.
 * COMMAND: e.g. setpriv --pdeathsig SIGTERM -- skopeo; "experimental-image-proxy --sockfd N" is appended.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int sock = -1;
static pid_t child = -1;
static char reply[1 << 20];

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "baseline: %s: %s\n", what, errno ? strerror(errno) : "failed");
  if (child > 0) {
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
  }
  exit(1);
}

/* Sends a request and receives its reply; returns the number of fds received into fds. */
static int call(const char *request, int *fds, int maxfds) {
  if (send(sock, request, strlen(request), MSG_NOSIGNAL) < 0) die("send");
  char control[CMSG_SPACE(sizeof(int) * 4)];
  struct iovec iov = {reply, sizeof reply - 1};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                       .msg_controllen = sizeof control};
  ssize_t n;
  do n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n <= 0) die("recvmsg");
  reply[n] = 0;
  int count = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (int i = 0; i < k && count < maxfds; i++) memcpy(&fds[count++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
  return count;
}

static int succeeded(void) { return strstr(reply, "\"success\":true") != NULL; }

static long long number(const char *field) {
  char key[32];
  snprintf(key, sizeof key, "\"%s\":", field);
  const char *p = strstr(reply, key);
  return p ? strtoll(p + strlen(key), NULL, 10) : -1;
}

/* Reads fd into buf until EOF or `limit` bytes (limit < 0: EOF only). */
static long long drain(int fd, char *buf, size_t len, long long limit) {
  long long total = 0;
  while (limit < 0 || total < limit) {
    ssize_t n = read(fd, buf, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("read");
    if (n == 0) break;
    total += n;
  }
  return total;
}

static int compare(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 9 || strcmp(argv[7], "--") != 0) {
    fprintf(stderr, "usage: baseline MODE REF DIGEST SIZE COUNT PIPESIZE -- COMMAND...\n");
    return 2;
  }
  const char *mode = argv[1], *ref = argv[2], *digest = argv[3];
  long long size = atoll(argv[4]);
  int count = atoi(argv[5]), pipesize = atoi(argv[6]);
  int ncmd = argc - 8;

  int pair[2];
  double t0 = now();
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) die("socketpair");
  char fdarg[16];
  snprintf(fdarg, sizeof fdarg, "%d", pair[1]);
  char **cargv = calloc(ncmd + 4, sizeof *cargv);
  memcpy(cargv, argv + 8, ncmd * sizeof *cargv);
  cargv[ncmd] = "experimental-image-proxy";
  cargv[ncmd + 1] = "--sockfd";
  cargv[ncmd + 2] = fdarg;
  child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    fcntl(pair[1], F_SETFD, 0); /* the child's end survives exec */
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    execvp(cargv[0], cargv);
    _exit(127);
  }
  close(pair[1]);
  sock = pair[0];
  int fds[4];

  if (call("{\"method\":\"Initialize\",\"args\":[]}", fds, 4) != 0 || !succeeded()) die("Initialize");
  double ready = now();
  char request[1024];
  if (strcmp(mode, "spawn") == 0) {
    printf("{\"mode\":\"spawn\",\"ms\":%.3f}\n", (ready - t0) * 1e3);
  } else {
    snprintf(request, sizeof request, "{\"method\":\"OpenImage\",\"args\":[\"%s\"]}", ref);
    if (call(request, fds, 4) != 0 || !succeeded()) die(reply);
    long long image = number("value");
    if (strcmp(mode, "rtt") == 0) {
      double *t = malloc(sizeof(double) * count);
      const char *close_missing = "{\"method\":\"CloseImage\",\"args\":[999999]}";
      double start = now();
      for (int i = 0; i < count; i++) {
        double a = now();
        if (call(close_missing, fds, 4) != 0 || succeeded()) die("CloseImage on a missing image succeeded");
        t[i] = now() - a;
      }
      double total = now() - start;
      qsort(t, count, sizeof *t, compare);
      printf("{\"mode\":\"rtt\",\"count\":%d,\"median_us\":%.2f,\"mean_us\":%.2f}\n", count, t[count / 2] * 1e6,
             total / count * 1e6);
    } else if (strcmp(mode, "getblob") == 0 || strcmp(mode, "rawblob") == 0) {
      int raw = strcmp(mode, "rawblob") == 0;
      size_t buflen = 4 << 20;
      char *buf = malloc(buflen);
      memset(buf, 0, buflen);
      double start = now();
      if (raw) snprintf(request, sizeof request, "{\"method\":\"GetRawBlob\",\"args\":[%lld,\"%s\"]}", image, digest);
      else snprintf(request, sizeof request, "{\"method\":\"GetBlob\",\"args\":[%lld,\"%s\",%lld]}", image, digest, size);
      int n = call(request, fds, 4);
      if (!succeeded() || n != (raw ? 2 : 1)) die(reply);
      if (pipesize > 0) fcntl(fds[0], F_SETPIPE_SZ, pipesize);
      long long got;
      if (raw) {
        got = drain(fds[0], buf, buflen, -1);
        long long errlen = drain(fds[1], buf, buflen, -1);
        close(fds[0]);
        close(fds[1]);
        if (errlen > 0) die("GetRawBlob reported an error");
      } else {
        long long pipeid = number("pipeid");
        got = drain(fds[0], buf, buflen, size);
        snprintf(request, sizeof request, "{\"method\":\"FinishPipe\",\"args\":[%lld]}", pipeid);
        if (call(request, fds + 1, 3) != 0 || !succeeded()) die(reply);
        close(fds[0]);
      }
      double seconds = now() - start;
      if (got != size) die("short blob");
      printf("{\"mode\":\"%s\",\"bytes\":%lld,\"seconds\":%.6f,\"gibps\":%.4f}\n", mode, got, seconds,
             got / seconds / (1 << 30));
    } else {
      fprintf(stderr, "baseline: unknown mode %s\n", mode);
    }
  }
  /* Shutdown gets no reply: skopeo exits and we reap it. */
  const char *bye = "{\"method\":\"Shutdown\",\"args\":[]}";
  send(sock, bye, strlen(bye), MSG_NOSIGNAL);
  close(sock);
  int status;
  waitpid(child, &status, 0);
  return 0;
}
