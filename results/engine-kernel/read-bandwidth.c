#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <time.h>
#define N (512UL<<20)
static char *buf; static int nth;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void* run(void*a){long id=(long)a; size_t per=N/nth; __m512i acc=_mm512_setzero_si512(); char*p=buf+id*per;
 for(size_t i=0;i<per;i+=256){acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i));acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+64));acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+128));acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+192));}
 long long r[8]; _mm512_storeu_si512(r,acc); return (void*)(r[0]&1);}
int main(int c,char**v){nth=atoi(v[1]); buf=aligned_alloc(64,N); for(size_t i=0;i<N;i+=4096)buf[i]=1;
 for(int rep=0;rep<5;rep++){pthread_t t[8]; double t0=now(); for(long i=0;i<nth;i++)pthread_create(&t[i],0,run,(void*)i); for(int i=0;i<nth;i++)pthread_join(t[i],0); double dt=now()-t0; printf("%d threads: %.1f GB/s\n",nth,N/dt/1e9);} }
