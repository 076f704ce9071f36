/* A program for `restrack run --heap/--files`: what it does first is what the
 * quota must already be there for.
 *
 *   RUNQUOTA_EARLY_MIB=MIB runquota early MARK   (the constructor maps MIB MiB,
 *                              before main; then main creates the file MARK: it
 *                              exists only if the program got past that mapping)
 *   runquota heap MIB         maps MIB MiB (untouched), prints "mapped MIB", then
 *                             sleeps 0.6 s (longer than a procfs check interval)
 *   runquota files N STATUS   opens /dev/null up to N times, prints "opened K"
 *                             and "EMFILE" if an open failed with it, exits STATUS
 *
 * RUNQUOTA_EARLY_MIB in the environment is read by the constructor (argv is not
 * handed to constructors portably).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void map_mib(long mib)
{
	void *p = mmap(NULL, (size_t)mib << 20, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
}

__attribute__((constructor)) static void early(void)
{
	const char *mib = getenv("RUNQUOTA_EARLY_MIB");
	if (mib)
		map_mib(atol(mib));
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "early")) {
		int fd = open(argv[2], O_CREAT | O_WRONLY, 0644);
		return fd < 0;
	}
	if (argc == 3 && !strcmp(argv[1], "heap")) {
		map_mib(atol(argv[2]));
		printf("mapped %s\n", argv[2]);
		fflush(stdout);
		usleep(600000);
		return 0;
	}
	if (argc == 4 && !strcmp(argv[1], "files")) {
		long want = atol(argv[2]), opened = 0;
		int failure = 0;
		while (opened < want) {
			if (open("/dev/null", O_RDONLY) < 0) {
				failure = errno;
				break;
			}
			opened++;
		}
		printf("opened %ld\n", opened);
		if (failure == EMFILE)
			printf("EMFILE\n");
		return atoi(argv[3]);
	}
	fprintf(stderr, "usage: runquota early MARK | heap MIB | files N STATUS\n");
	return 2;
}
