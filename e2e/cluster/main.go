// Command controlplane runs a real, single-process Kubernetes control plane on 127.0.0.1: embedded
// etcd, kube-apiserver, kube-controller-manager and kube-scheduler, all from the Kubernetes Go
// modules (k8s.io/kubernetes v1.37 used as a library). No kubelet: e2e/cluster/kubelet.py plays it.
//
// It writes, under --data-dir:
//
//	pki/                    CA, serving and client certificates, the ServiceAccount signing key
//	etcd/                   etcd's data (kept across restarts)
//	admin.kubeconfig        a system:masters client
//	nodes/<name>.kubeconfig one system:node:<name> client per --node (for a kubelet; Node authorizer)
//	ports.json              the ports in use (reused on the next start, so kubeconfigs stay valid)
//	ready                   JSON, written only once /readyz is ok and the default namespace and its
//	                        default ServiceAccount exist; removed on shutdown
//
// SIGTERM or SIGINT stops it cleanly (scheduler and controllers first, then the apiserver, then etcd).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

type config struct {
	dataDir       string
	apiserverPort int
	etcdPort      int
	etcdPeerPort  int
	controllers   string
	nodes         []string
	etcdFsync     bool
	readyTimeout  time.Duration
}

type portsFile struct {
	APIServer int `json:"apiserver"`
	Etcd      int `json:"etcd"`
	EtcdPeer  int `json:"etcdPeer"`
}

type readyFile struct {
	PID             int               `json:"pid"`
	Server          string            `json:"server"`
	Kubeconfig      string            `json:"kubeconfig"`
	CA              string            `json:"ca"`
	NodeKubeconfigs map[string]string `json:"nodeKubeconfigs"`
	ServiceCIDR     string            `json:"serviceCIDR"`
	Issuer          string            `json:"serviceAccountIssuer"`
	StartedIn       string            `json:"startedIn"`
}

const (
	serviceCIDR = "10.0.0.0/16"
	serviceIP   = "10.0.0.1"
	issuer      = "https://kubernetes.default.svc.cluster.local"
)

func main() {
	klog.InitFlags(nil)
	var cfg config
	var nodes string
	flag.StringVar(&cfg.dataDir, "data-dir", "state", "folder for certificates, etcd data, kubeconfigs and the ready file")
	flag.IntVar(&cfg.apiserverPort, "apiserver-port", 0, "kube-apiserver's secure port on 127.0.0.1 (0: the previous run's, else a free one)")
	flag.IntVar(&cfg.etcdPort, "etcd-port", 0, "etcd's client port on 127.0.0.1 (0: the previous run's, else a free one)")
	flag.IntVar(&cfg.etcdPeerPort, "etcd-peer-port", 0, "etcd's peer port on 127.0.0.1 (0: the previous run's, else a free one)")
	flag.StringVar(&cfg.controllers, "controllers", "*", "kube-controller-manager --controllers (\"*\": its default set, which includes job, deployment, replicaset, garbage-collector, endpointslice, serviceaccount, serviceaccount-token and namespace)")
	flag.StringVar(&nodes, "nodes", "", "comma-separated Node names to write system:node kubeconfigs for (the process kubelet's identities)")
	flag.BoolVar(&cfg.etcdFsync, "etcd-fsync", false, "fsync etcd's writes (off by default: a throwaway test cluster on a slow disk)")
	flag.DurationVar(&cfg.readyTimeout, "ready-timeout", 5*time.Minute, "give up when not ready after this long")
	flag.Parse()
	for _, n := range strings.Split(nodes, ",") {
		if n = strings.TrimSpace(n); n != "" {
			cfg.nodes = append(cfg.nodes, n)
		}
	}
	if err := run(cfg); err != nil {
		klog.ErrorS(err, "control plane failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

// freePort asks the kernel for a free port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func resolvePorts(cfg *config) (portsFile, error) {
	var prev portsFile
	if data, err := os.ReadFile(filepath.Join(cfg.dataDir, "ports.json")); err == nil {
		_ = json.Unmarshal(data, &prev)
	}
	pick := func(flagValue, previous int) (int, error) {
		if flagValue != 0 {
			return flagValue, nil
		}
		if previous != 0 {
			if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", previous)); err == nil {
				l.Close()
				return previous, nil
			}
		}
		return freePort()
	}
	var p portsFile
	var err error
	if p.APIServer, err = pick(cfg.apiserverPort, prev.APIServer); err != nil {
		return p, err
	}
	if p.Etcd, err = pick(cfg.etcdPort, prev.Etcd); err != nil {
		return p, err
	}
	if p.EtcdPeer, err = pick(cfg.etcdPeerPort, prev.EtcdPeer); err != nil {
		return p, err
	}
	data, _ := json.MarshalIndent(p, "", "  ")
	return p, os.WriteFile(filepath.Join(cfg.dataDir, "ports.json"), data, 0o644)
}

func writeJSONAtomically(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func run(cfg config) error {
	started := time.Now()
	dataDir, err := filepath.Abs(cfg.dataDir)
	if err != nil {
		return err
	}
	cfg.dataDir = dataDir
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return err
	}
	readyPath := filepath.Join(dataDir, "ready")
	_ = os.Remove(readyPath)

	ports, err := resolvePorts(&cfg)
	if err != nil {
		return fmt.Errorf("ports: %w", err)
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", ports.APIServer)

	p, err := loadOrCreatePKI(filepath.Join(dataDir, "pki"))
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	hosts := []string{"127.0.0.1", "localhost", serviceIP, "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	if err := p.issue("apiserver", "kube-apiserver", nil, true, hosts); err != nil {
		return err
	}
	clients := []struct{ name, cn, org string }{
		{"admin", "kubernetes-admin", "system:masters"},
		{"kube-controller-manager", "system:kube-controller-manager", ""},
		{"kube-scheduler", "system:kube-scheduler", ""},
	}
	for _, n := range cfg.nodes {
		clients = append(clients, struct{ name, cn, org string }{"node-" + n, "system:node:" + n, "system:nodes"})
	}
	nodeKubeconfigs := map[string]string{}
	if err := os.MkdirAll(filepath.Join(dataDir, "nodes"), 0o755); err != nil {
		return err
	}
	for _, c := range clients {
		var orgs []string
		if c.org != "" {
			orgs = []string{c.org}
		}
		if err := p.issue(c.name, c.cn, orgs, false, nil); err != nil {
			return err
		}
		path := filepath.Join(p.dir, c.name+".kubeconfig")
		switch {
		case c.name == "admin":
			path = filepath.Join(dataDir, "admin.kubeconfig")
		case strings.HasPrefix(c.name, "node-"):
			node := strings.TrimPrefix(c.name, "node-")
			path = filepath.Join(dataDir, "nodes", node+".kubeconfig")
			nodeKubeconfigs[node] = path
		}
		if err := p.kubeconfig(path, server, c.name, c.cn); err != nil {
			return err
		}
	}
	adminKubeconfig := filepath.Join(dataDir, "admin.kubeconfig")

	// Signals: the first stops everything cleanly, a second exits at once.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	stopping := make(chan struct{})
	go func() {
		<-sigs
		klog.InfoS("signal received: shutting down")
		close(stopping)
		<-sigs
		klog.InfoS("second signal: exiting now")
		klog.Flush()
		os.Exit(1)
	}()

	etcd, err := startEtcd(filepath.Join(dataDir, "etcd"), ports, cfg.etcdFsync)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		klog.InfoS("etcd stopped")
	}()

	apiCtx, apiCancel := context.WithCancel(context.Background())
	defer apiCancel()
	apiDone, err := startAPIServer(apiCtx, p, ports)
	if err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	stopAPIServer := func() {
		apiCancel()
		select {
		case err := <-apiDone:
			if err != nil {
				klog.ErrorS(err, "kube-apiserver stopped with an error")
			}
		case <-time.After(60 * time.Second):
			klog.InfoS("kube-apiserver did not stop within 60s")
		}
		klog.InfoS("kube-apiserver stopped")
	}

	admin, err := newClient(adminKubeconfig)
	if err != nil {
		stopAPIServer()
		return err
	}
	readyCtx, readyCancel := context.WithTimeout(context.Background(), cfg.readyTimeout)
	defer readyCancel()
	go func() {
		select {
		case <-stopping:
			readyCancel()
		case <-readyCtx.Done():
		}
	}()
	if err := waitReadyz(readyCtx, admin, apiDone); err != nil {
		stopAPIServer()
		return fmt.Errorf("kube-apiserver not ready: %w", err)
	}
	klog.InfoS("kube-apiserver ready", "server", server, "after", time.Since(started).Round(time.Millisecond))

	ctrlCtx, ctrlCancel := context.WithCancel(context.Background())
	defer ctrlCancel()
	kcmDone, err := startControllerManager(ctrlCtx, p, cfg.controllers)
	if err != nil {
		stopAPIServer()
		return fmt.Errorf("kube-controller-manager: %w", err)
	}
	schedDone, err := startScheduler(ctrlCtx, p)
	if err != nil {
		ctrlCancel()
		stopAPIServer()
		return fmt.Errorf("kube-scheduler: %w", err)
	}
	stopControllers := func() {
		ctrlCancel()
		for name, ch := range map[string]<-chan error{"kube-controller-manager": kcmDone, "kube-scheduler": schedDone} {
			select {
			case err := <-ch:
				if err != nil && !errors.Is(err, context.Canceled) {
					klog.ErrorS(err, "stopped with an error", "component", name)
				}
			case <-time.After(30 * time.Second):
				klog.InfoS("did not stop within 30s", "component", name)
			}
			klog.InfoS("stopped", "component", name)
		}
	}
	shutdown := func() {
		_ = os.Remove(readyPath)
		stopControllers()
		stopAPIServer()
	}

	if err := waitDefaultServiceAccount(readyCtx, admin, apiDone, kcmDone, schedDone); err != nil {
		shutdown()
		return fmt.Errorf("not ready: %w", err)
	}
	if err := writeJSONAtomically(readyPath, readyFile{
		PID: os.Getpid(), Server: server, Kubeconfig: adminKubeconfig, CA: p.path("ca.crt"),
		NodeKubeconfigs: nodeKubeconfigs, ServiceCIDR: serviceCIDR, Issuer: issuer,
		StartedIn: time.Since(started).Round(time.Millisecond).String(),
	}); err != nil {
		shutdown()
		return err
	}
	klog.InfoS("control plane ready", "kubeconfig", adminKubeconfig, "after", time.Since(started).Round(time.Millisecond))

	var failure error
	select {
	case <-stopping:
	case err := <-apiDone:
		failure = fmt.Errorf("kube-apiserver exited: %v", err)
		apiDone = closedErr()
	case err := <-kcmDone:
		failure = fmt.Errorf("kube-controller-manager exited: %v", err)
		kcmDone = closedErr()
	case err := <-schedDone:
		failure = fmt.Errorf("kube-scheduler exited: %v", err)
		schedDone = closedErr()
	}
	shutdown()
	return failure
}

// closedErr stands in for a component's done channel once its result has been read.
func closedErr() <-chan error {
	ch := make(chan error)
	close(ch)
	return ch
}
