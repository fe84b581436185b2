/*
 * The workload of the bed's FROM scratch image (docker.io/library/e2e-scratch:1): one static
 * binary, no shell, no libraries, nothing else in the image. Its first instruction records
 * when it started (CLOCK_REALTIME, for the start-latency benchmark), then it reports whether
 * the identity files were already there, like the busybox scenarios' check.
 *
 *   idcheck [CERT_DIR]    (default /var/certs)
 */
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	const char *dir = argc > 1 ? argv[1] : "/var/certs";
	char path[4096];
	printf("started-at-ns=%lld\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
	snprintf(path, sizeof path, "%s/svid.pem", dir);
	puts(access(path, F_OK) == 0 ? "svid exists!" : "svid does NOT exist.");
	snprintf(path, sizeof path, "%s/svid_key.pem", dir);
	int fd = open(path, O_RDONLY);
	if (fd >= 0) {
		printf("key-readable-by-%d\n", (int)getuid());
		close(fd);
	}
	return fflush(stdout) == 0 ? 0 : 1;
}
